"""The `free-server` subcommands, one small module each; `free_server.cli` wires them up."""
