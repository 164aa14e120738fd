"""FREE-Fed data owner's client: export, inspect, submit, fetch, join, fine-tune."""
