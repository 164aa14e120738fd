"""Security: Ed25519 keys, canonical manifest bytes, signing and verification.

- `keys`: Ed25519 signing keys (PKCS#8 / SubjectPublicKeyInfo PEM) and key ids.
- `node_keys`: EC P-384 key pairs for Flower SuperNode authentication (OpenSSH format).
- `canonical`: the bytes every signature covers (domain tag + canonical JSON).
- `signing`: sign a record, verify a signed record against a trusted key.
"""

from free_common.security.canonical import (
    DOMAIN_TAGS,
    canonical_bytes,
    record_from_canonical,
)
from free_common.security.keys import (
    generate_signing_key,
    key_id,
    load_private_key,
    load_public_key,
    public_key_from_pem,
    public_key_pem,
    write_private_key,
    write_public_key,
)
from free_common.security.node_keys import (
    generate_node_key,
    load_node_private_key,
    node_public_key_line,
    write_node_key_pair,
)
from free_common.security.signing import sign, signature_is_valid, signer_key_id, verify

__all__ = [
    "DOMAIN_TAGS",
    "canonical_bytes",
    "generate_node_key",
    "generate_signing_key",
    "key_id",
    "load_node_private_key",
    "load_private_key",
    "load_public_key",
    "node_public_key_line",
    "public_key_from_pem",
    "public_key_pem",
    "record_from_canonical",
    "sign",
    "signature_is_valid",
    "signer_key_id",
    "verify",
    "write_node_key_pair",
    "write_private_key",
    "write_public_key",
]
