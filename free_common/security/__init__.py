"""Security: Ed25519 keys, canonical manifest bytes, signing and verification."""
