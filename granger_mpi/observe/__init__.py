"""What a run shows while it goes: metrics files and the progress line (``metrics``), other
sinks (``reporters``), the per-rank time split (``timing``), status files and the hang
watchdog (``status``)."""
