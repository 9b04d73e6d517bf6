"""A model's parameters: named tensors laid end to end in one flat buffer."""

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class Tensor:
    """One named view of the flat buffer."""

    name: str
    shape: tuple
    offset: int

    @property
    def size(self):
        """Number of elements."""
        return math.prod(self.shape)


@dataclass(frozen=True)
class Layout:
    """Named tensors laid end to end in one contiguous buffer."""

    tensors: tuple

    @property
    def size(self):
        """Total number of elements."""
        last = self.tensors[-1]
        return last.offset + last.size

    def views(self, flat):
        """``{name: view}`` into ``flat``; writing a view writes the buffer."""
        if flat.shape != (self.size,):
            raise ValueError(f"flat buffer has shape {flat.shape}, layout needs ({self.size},)")
        return {t.name: flat[t.offset:t.offset + t.size].reshape(t.shape) for t in self.tensors}


def end_to_end(shapes):
    """The ``Layout`` of ``[(name, shape), ...]`` laid end to end in this order."""
    tensors, offset = [], 0
    for name, shape in shapes:
        tensors.append(Tensor(name, tuple(int(s) for s in shape), offset))
        offset += tensors[-1].size
    return Layout(tuple(tensors))
