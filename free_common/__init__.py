"""FREE-Fed: data-free meta-learning as a federated, privacy-oriented system.

`free_common` holds what the aggregator (`free_server`) and the data owners'
client (`free_client`) both need: errors and config, data, models, security,
the FREE engine, and the protobuf wire layer.
"""

__version__ = "0.1.0"
