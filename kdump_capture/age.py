"""The age file format (age-encryption.org/v1) on `cryptography`'s primitives: streaming
encryption to X25519 and SSH (ed25519, rsa) public keys, and decryption with their identities.

Spec: https://age-encryption.org/v1 (C2SP). The output is what ``age -r`` writes and
``age -d -i KEY`` reads. Why not pyrage: bench/results/encryption.md (it pulls its input
through a reader, so a push-style writer would need a thread bridge, and it ran 3-5x slower
than OpenSSL's ChaCha20-Poly1305 on one CPU; `cryptography` is a dependency already).

Layout: a text header (version line, one stanza per recipient wrapping the 16-byte file key,
``--- `` and an HMAC over the header), a 16-byte nonce, then the payload in 64 KiB chunks,
each sealed with ChaCha20-Poly1305 under a key derived from the file key and the nonce; the
chunk's 12-byte nonce is its counter (11 bytes, big-endian) and a last-chunk flag.

Everything read by the decryptor is untrusted: the header is bounded (``MAX_HEADER``),
parsed line by line, and no stanza body is larger than an RSA-8192 block.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import re
import struct
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from cryptography.exceptions import InvalidTag, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from .errors import ConfigError, DecryptError, VerifyError

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (start-up time)
if TYPE_CHECKING:
    from .checksum import Hasher

VERSION_LINE = b"age-encryption.org/v1"
CHUNK = 64 << 10  # plaintext bytes per payload chunk (fixed by the format)
TAG = 16  # Poly1305 tag
SEALED = CHUNK + TAG
NONCE_SIZE = 16  # the payload nonce after the header
FILE_KEY_SIZE = 16
COLUMNS = 64  # stanza bodies are base64 wrapped at 64 columns
# A header with a few dozen recipients is a few KiB (an RSA-4096 stanza is about 720 bytes).
MAX_HEADER = 64 << 10
MAX_BODY = 1024  # an RSA-8192 ciphertext is 1024 bytes
# The output is batched: this many sealed chunks per write to the inner sink (about 1 MiB,
# the size of the writers' own chunks, so the sink sees no more calls than without us).
BATCH = 16

X25519_LABEL = b"age-encryption.org/v1/X25519"
ED25519_LABEL = b"age-encryption.org/v1/ssh-ed25519"
RSA_LABEL = b"age-encryption.org/v1/ssh-rsa"
RSA_MIN_BITS = 2048  # age refuses smaller RSA keys
# An RSA-16384 OpenSSH key is about 12 KiB; an identity file of many keys a few hundred.
MAX_IDENTITY_FILE = 1 << 20

_ARG = re.compile(rb"[\x21-\x7e]+")


# --- encodings --------------------------------------------------------------------------------


def b64(data: bytes) -> str:
    """Base64 without padding, as every age header field is written."""
    return base64.b64encode(data).decode().rstrip("=")


def unb64(text: bytes | str, what: str) -> bytes:
    """Strict unpadded base64 (age rejects padding and non-canonical encodings)."""
    s = text.decode("ascii", "replace") if isinstance(text, bytes) else text
    if "=" in s or not re.fullmatch(r"[A-Za-z0-9+/]*", s):
        raise VerifyError(f"{what}: not unpadded base64")
    try:
        raw = base64.b64decode(s + "=" * (-len(s) % 4), validate=True)
    except ValueError:
        raise VerifyError(f"{what}: not unpadded base64") from None
    if b64(raw) != s:
        raise VerifyError(f"{what}: non-canonical base64")
    return raw


_BECH32 = "qpzry9x8gf2tvdw0s3jn54khce6mua7l"
_BECH32_GEN = (0x3B6A57B2, 0x26508E6D, 0x1EA119FA, 0x3D4233DD, 0x2A1462B3)


def _polymod(values: Iterable[int]) -> int:
    chk = 1
    for v in values:
        top = chk >> 25
        chk = (chk & 0x1FFFFFF) << 5 ^ v
        for i in range(5):
            chk ^= _BECH32_GEN[i] if (top >> i) & 1 else 0
    return chk


def _hrp_expand(hrp: str) -> list[int]:
    return [ord(c) >> 5 for c in hrp] + [0] + [ord(c) & 31 for c in hrp]


def _convertbits(data: Iterable[int], frombits: int, tobits: int, pad: bool) -> list[int] | None:
    acc = bits = 0
    out = []
    maxv = (1 << tobits) - 1
    for v in data:
        acc = (acc << frombits) | v
        bits += frombits
        while bits >= tobits:
            bits -= tobits
            out.append((acc >> bits) & maxv)
    if pad and bits:
        out.append((acc << (tobits - bits)) & maxv)
    elif not pad and (bits >= frombits or (acc << (tobits - bits)) & maxv):
        return None
    return out


def bech32_decode(text: str) -> tuple[str, bytes] | None:
    """(hrp, data) of a Bech32 string (no length limit, as age's keys need), else None."""
    if text.lower() != text and text.upper() != text:
        return None
    s = text.lower()
    pos = s.rfind("1")
    if pos < 1 or pos + 7 > len(s) or len(s) > 1024:
        return None
    hrp = s[:pos]
    if any(not 33 <= ord(c) <= 126 for c in hrp):
        return None
    try:
        values = [_BECH32.index(c) for c in s[pos + 1 :]]
    except ValueError:
        return None
    if _polymod(_hrp_expand(hrp) + values) != 1:
        return None
    data = _convertbits(values[:-6], 5, 8, False)
    return None if data is None else (hrp, bytes(data))


def bech32_encode(hrp: str, data: bytes) -> str:
    values = _convertbits(data, 8, 5, True) or []
    poly = _polymod([*_hrp_expand(hrp), *values, 0, 0, 0, 0, 0, 0]) ^ 1
    checksum = [(poly >> 5 * (5 - i)) & 31 for i in range(6)]
    return hrp + "1" + "".join(_BECH32[v] for v in values + checksum)


def _hkdf(ikm: bytes, salt: bytes, info: bytes, length: int = 32) -> bytes:
    # An empty salt is HKDF's all-zero default (RFC 5869), as age's Go code passes nil.
    return HKDF(hashes.SHA256(), length, salt or None, info).derive(ikm)


def _x25519(scalar: bytes, point: bytes) -> bytes:
    """X25519(scalar, point); ValueError for a low-order point (an all-zero result)."""
    return X25519PrivateKey.from_private_bytes(scalar).exchange(
        X25519PublicKey.from_public_bytes(point)
    )


def _x25519_base(scalar: bytes) -> bytes:
    return (
        X25519PrivateKey.from_private_bytes(scalar)
        .public_key()
        .public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    )


# Curve25519 field prime and the Edwards curve constant d.
_P = 2**255 - 19
_D = (-121665 * pow(121666, _P - 2, _P)) % _P


def ed25519_to_x25519(pk: bytes) -> bytes:
    """The Montgomery u-coordinate of an Ed25519 public key, u = (1 + y) / (1 - y).

    The point must decode (canonical y, x recoverable), as Go's edwards25519.SetBytes
    demands before age converts it; ValueError otherwise.
    """
    if len(pk) != 32:
        raise ValueError("an Ed25519 key is 32 bytes")
    y = int.from_bytes(pk, "little") & ((1 << 255) - 1)
    sign = pk[31] >> 7
    if y >= _P:
        raise ValueError("non-canonical Ed25519 point")
    u2 = (y * y - 1) % _P
    v = (_D * y * y + 1) % _P
    x2 = u2 * pow(v, _P - 2, _P) % _P
    if x2 and pow(x2, (_P - 1) // 2, _P) != 1:
        raise ValueError("not a point on Ed25519")
    if x2 == 0 and sign:
        raise ValueError("invalid Ed25519 point encoding")
    if y == 1:
        raise ValueError("Ed25519 identity point")
    u = (1 + y) * pow((1 - y) % _P, _P - 2, _P) % _P
    return u.to_bytes(32, "little")


def _ssh_string(buf: bytes, off: int) -> tuple[bytes, int]:
    if off + 4 > len(buf):
        raise ValueError("truncated SSH key")
    (n,) = struct.unpack_from(">I", buf, off)
    if off + 4 + n > len(buf):
        raise ValueError("truncated SSH key")
    return buf[off + 4 : off + 4 + n], off + 4 + n


def ssh_tag(wire: bytes) -> str:
    """The stanza tag of an SSH key: the first 4 bytes of SHA-256 of its wire encoding."""
    return b64(hashlib.sha256(wire).digest()[:4])


def _aead_seal(key: bytes, plaintext: bytes) -> bytes:
    return ChaCha20Poly1305(key).encrypt(bytes(12), plaintext, None)


def _aead_open(key: bytes, sealed: bytes) -> bytes | None:
    if len(sealed) != FILE_KEY_SIZE + TAG:
        return None
    try:
        return ChaCha20Poly1305(key).decrypt(bytes(12), sealed, None)
    except InvalidTag:
        return None


# --- recipients ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Stanza:
    type: str
    args: tuple[str, ...]
    body: bytes

    def encode(self) -> bytes:
        text = b64(self.body)
        lines = [text[i : i + COLUMNS] for i in range(0, len(text), COLUMNS)]
        if not lines or len(lines[-1]) == COLUMNS:
            lines.append("")  # the body ends with a line shorter than 64 columns
        head = " ".join(("->", self.type, *self.args))
        return (head + "\n" + "\n".join(lines) + "\n").encode()


@dataclass(frozen=True)
class Recipient:
    """One public key a dump is encrypted to, as ``age -r`` takes it."""

    kind: str  # "X25519", "ssh-ed25519" or "ssh-rsa"
    text: str  # the key as configured, without an SSH comment
    key: bytes  # X25519: the public key; ssh-ed25519: its X25519 form; ssh-rsa: wire
    wire: bytes = b""  # the SSH key's wire encoding (ssh-* only)

    def wrap(self, file_key: bytes) -> Stanza:
        if self.kind == "X25519":
            eph = os.urandom(32)
            share = _x25519_base(eph)
            shared = _x25519(eph, self.key)
            wrap_key = _hkdf(shared, share + self.key, X25519_LABEL)
            return Stanza("X25519", (b64(share),), _aead_seal(wrap_key, file_key))
        if self.kind == "ssh-ed25519":
            eph = os.urandom(32)
            share = _x25519_base(eph)
            shared = _x25519(eph, self.key)
            tweak = _hkdf(b"", self.wire, ED25519_LABEL)
            shared = _x25519(tweak, shared)
            wrap_key = _hkdf(shared, share + self.key, ED25519_LABEL)
            return Stanza(
                "ssh-ed25519", (ssh_tag(self.wire), b64(share)), _aead_seal(wrap_key, file_key)
            )
        pub = serialization.load_ssh_public_key(self.text.encode())
        assert isinstance(pub, rsa.RSAPublicKey)
        body = pub.encrypt(file_key, _oaep())
        return Stanza("ssh-rsa", (ssh_tag(self.wire),), body)


def _oaep() -> padding.OAEP:
    return padding.OAEP(padding.MGF1(hashes.SHA256()), hashes.SHA256(), RSA_LABEL)


def parse_recipient(text: str) -> Recipient:
    """One recipient: ``age1...``, or an SSH public key line (``ssh-ed25519 AAAA... [comment]``,
    ``ssh-rsa AAAA...``). Raises ValueError with the reason (never echoing key material)."""
    text = text.strip()
    if text.startswith("age1"):
        dec = bech32_decode(text)
        if dec is None or dec[0] != "age" or len(dec[1]) != 32:
            raise ValueError("not a valid age X25519 public key (age1...)")
        return Recipient("X25519", text.lower(), dec[1])
    words = text.split()
    if len(words) >= 2 and words[0] in ("ssh-ed25519", "ssh-rsa"):
        kind, blob = words[0], words[1]
        try:
            wire = base64.b64decode(blob, validate=True)
        except ValueError:
            raise ValueError(f"{kind} key: not base64") from None
        name, off = _ssh_string(wire, 0)
        if name.decode("ascii", "replace") != kind:
            raise ValueError(f"{kind} key: the encoded key is of type {name[:32]!r}")
        line = f"{kind} {blob}"
        if kind == "ssh-ed25519":
            pk, off = _ssh_string(wire, off)
            if off != len(wire):
                raise ValueError("ssh-ed25519 key: trailing data")
            return Recipient(kind, line, ed25519_to_x25519(pk), wire)
        try:
            pub = serialization.load_ssh_public_key(line.encode())
        except (ValueError, UnsupportedAlgorithm) as e:
            raise ValueError(f"ssh-rsa key: {e}") from None
        if not isinstance(pub, rsa.RSAPublicKey) or pub.key_size < RSA_MIN_BITS:
            raise ValueError(f"ssh-rsa key: fewer than {RSA_MIN_BITS} bits")
        return Recipient(kind, line, wire, wire)
    raise ValueError("expected an age1... key or an ssh-ed25519/ssh-rsa public key")


# An SSH key's type word ("ssh-ed25519", "ecdsa-sha2-nistp256", "sk-ssh-ed25519@openssh.com").
_SSH_TYPE = re.compile(r"[a-z][a-z0-9@.-]*")


def _starts_key(words: list[str], i: int) -> bool:
    """Whether ``words[i]`` starts a key, not a comment: an age key (public or private), or
    an SSH key of any type: its type word, then its base64 blob, which always begins "AAAA"
    (the length of the type name). A key of a type age cannot use is then refused by name,
    never taken for a comment and dropped."""
    w = words[i]
    if w.startswith("age1") or w.upper().startswith("AGE-SECRET-KEY-"):
        return True
    return i + 1 < len(words) and words[i + 1].startswith("AAAA") and bool(_SSH_TYPE.fullmatch(w))


def parse_recipients(value: str) -> tuple[Recipient, ...]:
    """KDUMP_ENCRYPT_TO: recipients separated by blanks (or commas), as ``age -r`` takes
    them; an SSH key is ``TYPE BASE64`` and may keep its comment (the words after it that
    do not look like a key). Raises ValueError; the message never quotes key material."""
    out: list[Recipient] = []
    words = value.replace(",", " ").split()
    i = 0
    while i < len(words):
        w = words[i]
        if w.upper().startswith("AGE-SECRET-KEY-"):
            raise ValueError(
                f"word {i + 1} is a private key: give its public key (age-keygen -y FILE)"
            )
        if w in ("ssh-ed25519", "ssh-rsa"):
            if i + 1 >= len(words):
                raise ValueError(f"{w} without its key")
            out.append(parse_recipient(f"{w} {words[i + 1]}"))
            i += 2
            # the key's comment ("root@host", "agent-key"): the words up to the next key
            while i < len(words) and not _starts_key(words, i):
                i += 1
        elif w.startswith("age1"):
            out.append(parse_recipient(w))
            i += 1
        elif _starts_key(words, i):
            raise ValueError(
                f"word {i + 1} is an SSH key of type {w[:40]!r}: age takes only ssh-ed25519 "
                "and ssh-rsa keys"
            )
        else:
            raise ValueError(f"word {i + 1} is not an age1... or ssh-ed25519/ssh-rsa key")
    # Every file's header holds a stanza per recipient; a reader takes at most MAX_HEADER
    # (ours, as parse_header: past it, a dump saved to these keys could not be decrypted).
    size = len(header(out, bytes(FILE_KEY_SIZE)))
    if size > MAX_HEADER:
        raise ValueError(
            f"{len(out)} recipients make an age header of {size} bytes, more than the "
            f"{MAX_HEADER} that decrypt reads: give fewer keys"
        )
    return tuple(out)


# --- encryption ---------------------------------------------------------------------------------


def header(recipients: Iterable[Recipient], file_key: bytes) -> bytes:
    """The header for ``file_key`` wrapped to each recipient, MAC included."""
    text = VERSION_LINE + b"\n" + b"".join(r.wrap(file_key).encode() for r in recipients) + b"---"
    mac = hmac.new(_hkdf(file_key, b"", b"header"), text, hashlib.sha256).digest()
    return text + b" " + b64(mac).encode() + b"\n"


def _nonce(counter: int, last: bool) -> bytes:
    return counter.to_bytes(11, "big") + (b"\x01" if last else b"\x00")


class Encryptor:
    """Seals a plaintext stream into age chunks; ``out`` receives the ciphertext in order.

    Memory: one pending chunk and one batch of sealed chunks (about 1 MiB), preallocated.
    The last chunk is sealed only by ``finish``: a full chunk is held back until more
    plaintext arrives, because the format marks the final chunk and it may be empty only
    when the whole plaintext is.
    """

    def __init__(
        self,
        recipients: Iterable[Recipient],
        out: Callable[[memoryview], None],
        plain_hash: Hasher | None = None,
    ) -> None:
        self.out = out
        file_key = os.urandom(FILE_KEY_SIZE)
        nonce = os.urandom(NONCE_SIZE)
        self.prefix = header(recipients, file_key) + nonce
        self.aead = ChaCha20Poly1305(_hkdf(file_key, nonce, b"payload"))
        self.pending = bytearray(CHUNK)
        self.pending_len = 0
        self.batch = bytearray(BATCH * SEALED)
        self.batch_view = memoryview(self.batch)
        self.batch_len = 0
        self.counter = 0
        self.started = False
        self.plain_size = 0
        # what the manifest records of the plaintext (checksum.new: SHA-256 unless chosen)
        self.plain_hash: Hasher = plain_hash or hashlib.sha256()

    def _seal(self, data: bytes | bytearray | memoryview, last: bool) -> None:
        if not self.started:
            self.started = True
            self.out(memoryview(self.prefix))
        if self.batch_len + SEALED > len(self.batch):
            self._flush()
        end = self.batch_len + len(data) + TAG
        self.aead.encrypt_into(
            _nonce(self.counter, last), data, None, self.batch_view[self.batch_len : end]
        )
        self.batch_len = end
        self.counter += 1
        if self.counter >= 1 << 88:  # 2^88 chunks: 16 YiB, never reached
            raise ValueError("age: too many chunks")

    def _flush(self) -> None:
        if self.batch_len:
            self.out(self.batch_view[: self.batch_len])
            self.batch_len = 0

    def write(self, data: bytes | bytearray | memoryview) -> None:
        view = memoryview(data).cast("B") if not isinstance(data, memoryview) else data
        if view.format != "B" or view.ndim != 1:
            view = view.cast("B")
        n = len(view)
        if not n:
            return
        self.plain_hash.update(view)
        self.plain_size += n
        i = 0
        if self.pending_len:
            take = min(CHUNK - self.pending_len, n)
            self.pending[self.pending_len : self.pending_len + take] = view[:take]
            self.pending_len += take
            i = take
            if i == n:
                return  # a full pending chunk waits: it may be the last
            self._seal(memoryview(self.pending), False)
            self.pending_len = 0
        # Whole chunks straight from the caller's buffer while more data follows them.
        while n - i > CHUNK:
            self._seal(view[i : i + CHUNK], False)
            i += CHUNK
        rest = n - i
        self.pending[:rest] = view[i:]
        self.pending_len = rest

    def finish(self) -> None:
        """Seal the last chunk and hand out everything."""
        self._seal(memoryview(self.pending)[: self.pending_len], True)
        self.pending_len = 0
        self._flush()


def encrypt_bytes(data: bytes, recipients: Iterable[Recipient]) -> bytes:
    """A whole small file (tests, the summary): the same stream as the Encryptor writes."""
    parts: list[bytes] = []
    enc = Encryptor(recipients, lambda v: parts.append(bytes(v)))
    enc.write(data)
    enc.finish()
    return b"".join(parts)


# --- identities and decryption ------------------------------------------------------------------


@dataclass(frozen=True)
class Identity:
    """A private key that may unwrap a stanza."""

    kind: str  # "X25519", "ssh-ed25519", "ssh-rsa"
    secret: bytes = b""  # X25519 scalar (ssh-ed25519: derived from the seed)
    public: bytes = b""  # X25519 public key (ssh-ed25519: the converted key)
    tag: str = ""  # ssh-*: the stanza tag
    wire: bytes = b""  # ssh-*: the public key's wire encoding
    rsa_key: rsa.RSAPrivateKey | None = None

    def __repr__(self) -> str:  # never print key material
        return f"<Identity {self.kind} {self.tag}>"

    def unwrap(self, st: Stanza) -> bytes | None:
        """The file key if this stanza is for this identity, else None."""
        try:
            if self.kind == "X25519" and st.type == "X25519" and len(st.args) == 1:
                share = unb64(st.args[0], "X25519 stanza")
                if len(share) != 32:
                    return None
                shared = _x25519(self.secret, share)
                return _aead_open(_hkdf(shared, share + self.public, X25519_LABEL), st.body)
            if self.kind == "ssh-ed25519" and st.type == "ssh-ed25519" and len(st.args) == 2:
                if st.args[0] != self.tag:
                    return None
                share = unb64(st.args[1], "ssh-ed25519 stanza")
                if len(share) != 32:
                    return None
                shared = _x25519(self.secret, share)
                shared = _x25519(_hkdf(b"", self.wire, ED25519_LABEL), shared)
                return _aead_open(_hkdf(shared, share + self.public, ED25519_LABEL), st.body)
            if self.kind == "ssh-rsa" and st.type == "ssh-rsa" and len(st.args) == 1:
                if st.args[0] != self.tag or self.rsa_key is None:
                    return None
                key = self.rsa_key.decrypt(st.body, _oaep())
                return key if len(key) == FILE_KEY_SIZE else None
        except (ValueError, VerifyError):
            return None
        return None


def _identity_from_x25519(secret: bytes) -> Identity:
    return Identity("X25519", secret, _x25519_base(secret))


def load_identities(path: str) -> list[Identity]:
    """Identities from an age identity file (``AGE-SECRET-KEY-1...`` lines, ``#`` comments)
    or an unencrypted OpenSSH/PEM ed25519 or rsa private key. Raises ConfigError."""
    from .bounds import read_small_file

    try:
        # A regular file only, opened without blocking: a FIFO would wait for a writer.
        data = read_small_file(path, MAX_IDENTITY_FILE)
    except OSError as e:
        raise ConfigError(f"--identity {path}: cannot read: {e.strerror or e}") from None
    except ValueError as e:
        raise ConfigError(f"--identity {e}") from None
    if data.startswith(VERSION_LINE) or b"-----BEGIN AGE ENCRYPTED FILE-----" in data:
        # age -d takes an identity file encrypted with a passphrase (age -p), and asks for it
        raise ConfigError(
            f"--identity {path}: the identity file is itself encrypted with age (as age -p "
            "writes it); decrypt the dump with 'age -d -i FILE' (it asks for the passphrase)"
        )
    if b"-----BEGIN" in data:
        return [_ssh_identity(path, data)]
    out = []
    for n, raw in enumerate(data.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith(b"#"):
            continue
        dec = bech32_decode(line.decode("ascii", "replace"))
        if dec is None or dec[0] != "age-secret-key-" or len(dec[1]) != 32:
            raise ConfigError(f"--identity {path}:{n}: not an age identity (AGE-SECRET-KEY-1...)")
        out.append(_identity_from_x25519(dec[1]))
    if not out:
        raise ConfigError(f"--identity {path}: no identity in the file")
    return out


def _ssh_identity(path: str, data: bytes) -> Identity:
    try:
        if b"OPENSSH PRIVATE KEY" in data:
            key = serialization.load_ssh_private_key(data, None)
        else:
            key = serialization.load_pem_private_key(data, None)
    except TypeError:
        raise ConfigError(
            f"--identity {path}: the key is passphrase-protected; decrypt with "
            "'age -d -i KEY' (it asks for the passphrase)"
        ) from None
    except (ValueError, UnsupportedAlgorithm) as e:
        raise ConfigError(f"--identity {path}: not a usable private key ({e})") from None
    if isinstance(key, Ed25519PrivateKey):
        seed = key.private_bytes(
            serialization.Encoding.Raw,
            serialization.PrivateFormat.Raw,
            serialization.NoEncryption(),
        )
        pub = key.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )
        wire = _ssh_wire(b"ssh-ed25519", pub)
        return Identity(
            "ssh-ed25519",
            hashlib.sha512(seed).digest()[:32],
            ed25519_to_x25519(pub),
            ssh_tag(wire),
            wire,
        )
    if isinstance(key, rsa.RSAPrivateKey):
        nums = key.public_key().public_numbers()
        wire = _ssh_wire(b"ssh-rsa", _mpint(nums.e), _mpint(nums.n))
        return Identity("ssh-rsa", tag=ssh_tag(wire), wire=wire, rsa_key=key)
    raise ConfigError(f"--identity {path}: only ed25519 and rsa SSH keys can decrypt age files")


def _ssh_wire(*fields: bytes) -> bytes:
    return b"".join(struct.pack(">I", len(f)) + f for f in fields)


def _mpint(n: int) -> bytes:
    raw = n.to_bytes((n.bit_length() + 8) // 8, "big")  # a leading 0 keeps it positive
    return raw


def parse_header(read: Callable[[int], bytes], label: str) -> tuple[list[Stanza], bytes, bytes]:
    """Read the header from a stream: (stanzas, the MAC'd text, the MAC). Bounded, strict.

    ``read(n)`` returns up to n bytes. Reads one byte at a time only until the header ends
    (at most MAX_HEADER bytes), so the payload stays in the stream.
    """
    lines: list[bytes] = []
    size = 0

    def line() -> bytes:
        nonlocal size
        buf = bytearray()
        while True:
            b = read(1)
            if not b:
                raise VerifyError(f"{label}: the age header is truncated")
            size += 1
            if size > MAX_HEADER:
                raise VerifyError(f"{label}: the age header is longer than {MAX_HEADER} bytes")
            if b == b"\n":
                lines.append(bytes(buf) + b"\n")
                return bytes(buf)
            buf += b

    first = read(len(VERSION_LINE) + 1)
    if first != VERSION_LINE + b"\n":
        raise VerifyError(f"{label}: offset 0x0: not an age file (no '{VERSION_LINE.decode()}')")
    size = len(first)
    lines.append(first)
    stanzas: list[Stanza] = []
    while True:
        ln = line()
        if ln.startswith(b"--- "):
            mac = unb64(ln[4:], f"{label}: header MAC")
            if len(mac) != 32:
                raise VerifyError(f"{label}: the header MAC is not 32 bytes")
            text = b"".join(lines)[: -len(ln) - 1] + b"---"
            return stanzas, text, mac
        if not ln.startswith(b"-> "):
            raise VerifyError(f"{label}: offset {size - len(ln) - 1:#x}: malformed age header")
        words = ln[3:].split(b" ")
        if not words or not all(_ARG.fullmatch(w) for w in words):
            raise VerifyError(f"{label}: offset {size - len(ln) - 1:#x}: malformed stanza")
        body = b""
        while True:
            b = line()
            at = size - len(b) - 1
            if len(b) > COLUMNS or b.startswith(b"-"):
                raise VerifyError(f"{label}: offset {at:#x}: malformed stanza body")
            body += b
            if len(body) > MAX_BODY * 4 // 3 + 4:
                raise VerifyError(f"{label}: offset {at:#x}: a stanza body is implausibly large")
            if len(b) < COLUMNS:
                break
        stanzas.append(
            Stanza(
                words[0].decode(),
                tuple(w.decode() for w in words[1:]),
                unb64(body, f"{label}: stanza body"),
            )
        )


def open_file_key(stanzas: list[Stanza], text: bytes, mac: bytes, ids: list[Identity], label: str):
    """The file key from the first stanza an identity opens; its header MAC must match."""
    if any(s.type == "scrypt" for s in stanzas):
        raise DecryptError(f"{label}: encrypted with a passphrase, not to a key")
    for st in stanzas:
        for ident in ids:
            key = ident.unwrap(st)
            if key is None:
                continue
            want = hmac.new(_hkdf(key, b"", b"header"), text, hashlib.sha256).digest()
            if not hmac.compare_digest(want, mac):
                raise VerifyError(f"{label}: the age header was altered (its MAC does not match)")
            return key
    kinds = ", ".join(sorted({s.type for s in stanzas})) or "none"
    raise DecryptError(
        f"{label}: no identity given can decrypt it (it is encrypted to {len(stanzas)} "
        f"recipient(s) of type {kinds}): wrong key?"
    )


class Decryptor:
    """Streams the plaintext of an age file: ``chunks()`` yields memoryviews of one chunk."""

    def __init__(self, f, ids: list[Identity], label: str) -> None:
        self.f = f
        self.label = label
        stanzas, text, mac = parse_header(f.read, label)
        self.file_key = open_file_key(stanzas, text, mac, ids, label)
        nonce = f.read(NONCE_SIZE)
        if len(nonce) != NONCE_SIZE:
            raise VerifyError(f"{label}: truncated after the age header")
        self.aead = ChaCha20Poly1305(_hkdf(self.file_key, nonce, b"payload"))
        # The payload's first byte in the file: the header (its MAC line is "--- " and 43
        # characters of base64, as parse_header demands) and the nonce.
        self.payload_at = len(text) + 1 + 43 + 1 + NONCE_SIZE

    def chunks(self):
        buf = bytearray(SEALED + 1)
        view = memoryview(buf)
        out = memoryview(bytearray(CHUNK))
        have = self._fill(view, 0)
        counter = 0
        while True:
            last = have <= SEALED
            n = have if last else SEALED
            at = self.payload_at + counter * SEALED
            if n < TAG or (last and n == TAG and counter):
                raise VerifyError(
                    f"{self.label}: offset {at:#x}: chunk {counter}: truncated or damaged "
                    "(the file ends early)"
                )
            try:
                self.aead.decrypt_into(_nonce(counter, last), view[:n], None, out[: n - TAG])
            except InvalidTag:
                raise VerifyError(
                    f"{self.label}: offset {at:#x}: chunk {counter} was altered or truncated: "
                    "its authentication tag does not match"
                ) from None
            yield out[: n - TAG]
            if last:
                return
            buf[0] = buf[SEALED]  # the byte read ahead to know this was not the last chunk
            have = self._fill(view, 1)
            counter += 1

    def _fill(self, view: memoryview, have: int) -> int:
        while have < len(view):
            n = self.f.readinto(view[have:])
            if not n:
                break
            have += n
        return have
