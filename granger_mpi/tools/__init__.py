"""Offline and diagnostic commands: ``inspect``, ``plots``, ``report``, ``runfiles``,
``scaling``, ``bench``, ``doctor``. Nothing of the runtime imports these."""
