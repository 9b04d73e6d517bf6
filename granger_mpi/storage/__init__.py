"""Files: HDF5 helpers (``h5files``), CRC32 checksums (``checksums``), durable writes
(``fsync``) and the versions recorded in every file (``versions``)."""
