"""Memory: the bank of recovered images per pseudo-class and task sampling from it.

- `bank`: `MemoryBank` (FIFO per pseudo-class, in RAM or on disk) and task sampling;
- `ring`: the bounded FIFO store behind each pseudo-class;
- `episode`: the `Episode` record a sampled task comes as.
"""

from free_common.memory.bank import MemoryBank, PseudoClass, pseudo_class_key
from free_common.memory.config import MemoryConfig
from free_common.memory.episode import Episode

__all__ = ["Episode", "MemoryBank", "MemoryConfig", "PseudoClass", "pseudo_class_key"]
