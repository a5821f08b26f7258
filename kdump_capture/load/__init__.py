"""The production-kernel side: check, load, estimate and the rebuild decision.

``system`` (can this machine do kdump), ``kexec`` (the capture command line and loading),
``rebuild`` (when the capture initramfs is stale), ``estimate`` (the crashkernel= this
machine and configuration need) and ``commands`` (the CLI commands). The save side never
imports this package except ``commands``, whose top level stays small.
"""
