"""The capture initramfs: newc cpio writer, runtime collector, module resolver, /init."""
