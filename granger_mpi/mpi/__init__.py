"""MPI plumbing: agreement on errors and the world (``runtime``), thread counts per rank
(``threads``), and ULFM: the probe, the launch flags, what a rank failure is (``ulfm``)."""
