"""Small value classes for the capture path, declared without ``dataclasses``.

Importing ``dataclasses`` pulls in ``inspect`` (with ``ast``, ``dis`` and ``tokenize``) and
each decorated class generates and compiles its methods at import: together ~20 ms of the
capture kernel's start-up, which is downtime. A ``Record`` subclass lists its fields in
``__slots__`` and sets them in an explicit ``__init__``; equality, hashing and ``repr``
come from the slots, as a dataclass's did.
"""

from __future__ import annotations


class Record:
    """A value: compares, hashes and prints by the fields named in ``__slots__``.

    Instances are treated as read-only once made (what ``frozen=True`` dataclasses were),
    except where a class documents a field that is updated.
    """

    __slots__ = ()
    #: fields left out of ``repr`` (they may hold secrets)
    _unshown: tuple[str, ...] = ()

    def _values(self) -> tuple:
        return tuple(getattr(self, name) for name in self.__slots__)

    def __eq__(self, other: object) -> bool:
        if other.__class__ is not self.__class__:
            return NotImplemented
        return self._values() == other._values()  # type: ignore[attr-defined]

    def __hash__(self) -> int:
        return hash(self._values())

    def __repr__(self) -> str:
        shown = [name for name in self.__slots__ if name not in self._unshown]
        fields = ", ".join(f"{name}={getattr(self, name)!r}" for name in shown)
        return f"{type(self).__name__}({fields})"

    def replace(self, **changes: object) -> Record:
        """A copy with ``changes`` (what ``dataclasses.replace`` did): the class's
        ``__init__`` takes every field by its name."""
        values = {name: getattr(self, name) for name in self.__slots__}
        values.update(changes)
        return type(self)(**values)

    def as_dict(self) -> dict:
        """The fields by name (what ``dataclasses.asdict`` gave for fields holding plain
        values; containers are shared, not copied)."""
        return {name: getattr(self, name) for name in self.__slots__}
