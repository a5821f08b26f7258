"""Directives this build does not implement: a value other than "off" fails before anything
is written (the dump side) or loaded (the load side), never silently ignored. Shared by
the save-side CLI and the load commands."""

from __future__ import annotations

from .errors import NotSupported

# Directives this engine does not implement, with the value that means "off". A value other
# than that fails before anything is written, never silently ignored.
UNSUPPORTED = {
    "KDUMP_COPY_KERNEL": ("no", "copying the kernel image next to the dump"),
    "MAKEDUMPFILE_OPTIONS": (
        "",
        "makedumpfile options (this engine is not makedumpfile; "
        "use KDUMP_DUMPLEVEL and KDUMP_DUMPFORMAT)",
    ),
    "KDUMP_FADUMP": ("no", "firmware-assisted dump (ppc64 only)"),
    "KDUMP_AUTO_RESIZE": ("no", "automatic resizing of the reservation (ppc64 only)"),
}
UNSUPPORTED_FLAGS = {"SPLIT", "XENALLDOMAINS"}
# The kdump-compressed formats: each needs a page codec (formats.KDUMP_CODECS, not imported
# here: the save path imports this module before it knows the format).
KDUMP_CODECS = ("compressed", "zstd", "lzo", "snappy")


def check_unsupported(cfg) -> None:
    """NotSupported (exit 9) for a dump-side feature this build or this machine cannot do:
    run before anything is written (save) or loaded (check, load, initramfs build)."""
    from .checksum import new

    try:
        new(cfg.checksum)  # KDUMP_CHECKSUM=xxh3 without the xxhash package
    except NotSupported as e:
        raise cfg.not_available("KDUMP_CHECKSUM", str(e)) from None
    for name, (_off, what) in UNSUPPORTED.items():
        if cfg.value(name):  # "" or a false boolean means the feature is off
            raise cfg.not_supported(name, what)
    if cfg.dumpformat in KDUMP_CODECS:
        # snappy (never written), or lzo/zstd without their library: the writer refused it
        # only in the capture kernel, after check and load had passed, and the dump was lost.
        from .formats.kdump import get_codec

        try:
            get_codec(cfg.dumpformat)
        except NotSupported as e:
            raise cfg.not_available("KDUMP_DUMPFORMAT", str(e)) from None
    flags = set(cfg["KDUMPTOOL_FLAGS"].upper().replace(",", " ").split())
    if flags & UNSUPPORTED_FLAGS:
        raise cfg.not_supported("KDUMPTOOL_FLAGS", " and ".join(sorted(flags & UNSUPPORTED_FLAGS)))


# Load-side directives this engine does not implement, with the value that means "off"
# (checked by check, load and initramfs build; a capture kernel never refuses a dump over them).
LOAD_UNSUPPORTED = {
    "KDUMP_UPDATE_BOOTLOADER": (
        "writing crashkernel= into the boot loader (add crashkernel= to the kernel command "
        "line yourself; `kdump-capture check` shows the reservation)"
    ),
    "KDUMP_CRASHKERNEL": (
        "setting the crashkernel= reservation from the configuration (add crashkernel= "
        "to the kernel command line yourself)"
    ),
}


def check_supported(cfg) -> None:
    """NotSupported (exit 9) for any feature, of either side, that this build cannot honour.

    Also the dump side's: an image loaded with such a configuration would fail in the
    capture kernel, when it is too late to fix it.
    """
    for name, what in LOAD_UNSUPPORTED.items():
        if cfg.value(name):  # "" or a false boolean means the feature is off
            raise cfg.not_supported(name, what)
    check_network_options(cfg)
    check_unsupported(cfg)


def network_needed(scheme: str, runlevel: str) -> bool:
    """Whether the capture image brings up the network for a target of ``scheme``
    (KDUMP_RUNLEVEL 3 or 5 asks for it whatever the target). Here, not in the builder: the
    load commands ask it in a first kernel that runs from a capture image's runtime."""
    return scheme != "file" or runlevel.strip() in ("3", "5")


def check_network_options(cfg) -> None:
    """NotSupported for an ``ip=DEV:...`` or ``ip=ADDR::GW:MASK:...`` in KDUMP_COMMANDLINE or
    KDUMP_COMMANDLINE_APPEND where the capture image brings up the network.

    SUSE's template says to put a static set-up there, and its dracut then configures the
    capture kernel's network from it instead of from KDUMP_NETCONFIG. Our /init reads only
    KDUMP_NETCONFIG: it asked for DHCP on a network without a DHCP server, and a network
    target lost the dump. ``ip=dhcp`` (or ``on``, ``any``, ``off``, ``none``, with no ``:``)
    asks for nothing our DHCP does not do, or for no network.
    """
    from .load.kexec import _key, kernel_words

    if cfg["KDUMP_DUMPDEV"].strip():
        return  # a dump-device image brings up no network
    force = cfg["KDUMP_NETCONFIG"].strip().endswith(":force")
    if not force and not any(network_needed(t.scheme, cfg["KDUMP_RUNLEVEL"]) for t in cfg.savedir):
        return
    for name in ("KDUMP_COMMANDLINE", "KDUMP_COMMANDLINE_APPEND"):
        for word in kernel_words(cfg[name]):
            if _key(word) == "ip" and ":" in word:
                raise cfg.not_available(
                    name,
                    "ip= with an interface or an address is not supported (SUSE's dracut "
                    "sets up the capture kernel's network from it; the capture image sets "
                    "it up from KDUMP_NETCONFIG only, and would use DHCP): remove it and set "
                    "KDUMP_NETCONFIG=DEV:static (the address DEV has when the image is "
                    "built) or DEV:dhcp",
                )
