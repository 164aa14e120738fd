"""FREE-Fed aggregator: exchange service, store, intake workers, Flower rounds."""
