"""FREE-Fed data owner's client: export, inspect, submit, fetch, join, fine-tune."""

import os

# gRPC's C core logs INFO lines (a failed TLS handshake, say) to stderr unless told
# otherwise, and reads the setting once, when grpc is first imported: set it before
# any client module imports grpc, so a failure ends as the CLI's one line.
os.environ.setdefault("GRPC_VERBOSITY", "ERROR")
