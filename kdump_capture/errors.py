"""One error tree for the whole tool; every class carries its process exit code.

The exit codes are part of the interface (README, "Exit codes") and never change meaning:

    0  success
    1  unexpected internal error (a bug: please report it with KDUMP_VERBOSE=8 output)
    2  bad configuration: config file, directive value, command-line option or target URL
    3  no crash dump present (the kernel did not boot from a crash)
    4  the vmcore (or dump file) is unreadable or malformed
    5  not enough free space on the target (KDUMP_FREE_DISK_SIZE)
    6  the target failed: I/O error, connection lost, remote error
    7  the target refused us: authentication failure or SSH host-key mismatch
    8  verification failed: a saved file does not match its recorded checksum
    9  requested feature is not supported (yet) by this build
   10  the dump device (KDUMP_DUMPDEV) is unusable
   11  the kernel cannot do kdump, or loading the capture kernel failed
   12  a configured script (KDUMP_PRESCRIPT, KDUMP_POSTSCRIPT) failed
   13  the dump was saved INCOMPLETE: the source ended early or stopped being readable;
       also `dmesg`/`summary` of a dump that did not finish (after what it holds)
   14  KDUMP_TRANSFER failed (exited non-zero or was killed): the dump may not be saved.
       Its own status is in the message, not in our exit code: raw, 7 would read as
       "authentication refused" and a signal as a negative number
   15  an encrypted dump cannot be decrypted with the identities given (wrong key)
  130  interrupted (SIGINT/SIGTERM)
"""

from __future__ import annotations


class KdumpError(Exception):
    """Root of all errors this tool reports to the user.

    ``str(err)`` is a one-line message for the console; ``exit_code`` is the
    documented process exit code.
    """

    exit_code = 1


class ConfigError(KdumpError):
    """A configuration value, option or URL is invalid."""

    exit_code = 2


class UrlError(ConfigError):
    """A target URL cannot be parsed."""


class NoDumpError(KdumpError):
    """There is no crash dump to save."""

    exit_code = 3


class VmcoreError(KdumpError):
    """The vmcore or a dump file is malformed; the message names the file and offset."""

    exit_code = 4


class ManifestError(VmcoreError):
    """A dump's manifest.json is unreadable, too large, or not what this tool writes."""


class FreeSpaceError(KdumpError):
    """Writing would leave less free space on the target than KDUMP_FREE_DISK_SIZE."""

    exit_code = 5


class TransportError(KdumpError):
    """The target failed during an operation (I/O error, connection lost, remote error)."""

    exit_code = 6


class TargetSettingError(TransportError):
    """A setting that only this target uses cannot be used (KDUMP_S3_CA_BUNDLE names no file
    of certificates): bad configuration, exit 2 as at ``load``. A target's failure all the
    same, so that the next target in KDUMP_SAVEDIR still gets the dump."""

    exit_code = 2


class UnsafeFile(TransportError):
    """A name on the target is a link, not a regular file (a FIFO, a device), or too large.

    Raised before anything is read through it: another host on a shared target may have
    planted it, and following it could hang the capture kernel, exhaust its memory, or
    reach files outside the target.
    """


class ConnectionLost(TransportError):
    """The connection to the target broke; the operation may be retried or resumed."""


class TargetFull(TransportError):
    """The target ran out of space (ENOSPC or the protocol's equivalent)."""

    exit_code = 5


class AuthError(TransportError):
    """The target refused our credentials or its host key is not the expected one. Never retried."""

    exit_code = 7


class VerifyError(KdumpError):
    """A saved dump does not match the checksums recorded when it was written."""

    exit_code = 8


class NotSupported(KdumpError):
    """A configured feature is not available in this build."""

    exit_code = 9


class DumpDeviceError(KdumpError):
    """The dump device cannot be used."""

    exit_code = 10


class LoadError(KdumpError):
    """The running kernel cannot do kdump, or loading the capture kernel failed."""

    exit_code = 11


class ScriptError(KdumpError):
    """A configured script failed and KDUMP_CONTINUE_ON_ERROR is false."""

    exit_code = 12


class IncompleteDump(KdumpError):
    """The dump was saved, but only part of it: the source ended before its expected size or
    stopped being readable. The manifest says ``"status": "incomplete"`` and why. Also a dump
    file read back (``dmesg``, ``summary``) that holds less than its headers promise."""

    exit_code = 13
    #: where the incomplete dump was saved (the target and directory), when known
    where: str | None = None


class TransferError(ScriptError):
    """The KDUMP_TRANSFER command failed; the message names its exit status or signal."""

    exit_code = 14


class DecryptError(KdumpError):
    """No identity given can open an encrypted dump file (a wrong key), or it was encrypted
    in a way we cannot open (a passphrase). Altered ciphertext is a VerifyError (exit 8)."""

    exit_code = 15


class Interrupted(KdumpError):
    """The dump was interrupted by a signal."""

    exit_code = 130


class WatchdogStop(Interrupted):
    """The capture kernel's /init saw no progress for KDUMP_SAVE_TIMEOUT seconds (SIGUSR1)."""


EXIT_CODES: dict[int, str] = {
    0: "success",
    1: "unexpected internal error",
    ConfigError.exit_code: "bad configuration, option or URL",
    NoDumpError.exit_code: "no crash dump present",
    VmcoreError.exit_code: "vmcore or dump file unreadable or malformed",
    FreeSpaceError.exit_code: "not enough free space on the target",
    TransportError.exit_code: "target failed (I/O, connection, remote error)",
    AuthError.exit_code: "target refused authentication or host key",
    VerifyError.exit_code: "verification failed",
    NotSupported.exit_code: "feature not supported by this build",
    DumpDeviceError.exit_code: "dump device unusable",
    LoadError.exit_code: "kernel cannot do kdump or loading failed",
    ScriptError.exit_code: "a configured pre/post script failed",
    IncompleteDump.exit_code: "dump INCOMPLETE (saved so, or a dump file read back is)",
    TransferError.exit_code: "KDUMP_TRANSFER failed",
    DecryptError.exit_code: "cannot decrypt: no identity matches (wrong key)",
    Interrupted.exit_code: "interrupted",
}
