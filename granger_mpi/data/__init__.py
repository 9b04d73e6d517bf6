"""Data: the partition rule (``partition``), dataset files and the per-rank batch stream
(``dataset``), and imports of foreign formats (``importers``)."""
