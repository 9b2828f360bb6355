#!/usr/bin/env python3
"""An independent verifier of Tally receipts, written from the formats alone (docs/formats.md,
docs/privacy.md), with Python's standard library only: no Tally code, no third-party package.

    tally_verify.py receipt --vkey V [--vkey V2] --receipt R.tlog-proof --entry R.entry [--personal P.json]

Checks, in order:

1. The receipt's checkpoint is a C2SP signed note carrying a valid Ed25519 signature by one of
   the given verifier keys (a signature by another key is ignored; a given key whose signature
   fails rejects the note).
2. The entry is at `index` in that checkpoint's tree: RFC 9162 leaf hash and inclusion proof.
3. With --personal (the ledger's `GET /v1/tenants/{tenant}/records/{seq}/personal` answer): every
   value opens its commitment in the entry's `personal` member,
   SHA-256(salt ‖ u32be(len(field)) ‖ field ‖ value); either every committed field is given, or
   none and the answer says `erased`.

Exit status: 0 valid, 1 invalid (the reason on stderr), 2 bad usage or unreadable input.
Ed25519 verification follows the reference code of RFC 8032, section 6: slow, and enough for a
handful of signatures.
"""

import argparse
import base64
import hashlib
import json
import sys

# --- Ed25519 (RFC 8032, section 6) -----------------------------------------------------------

P = 2**255 - 19
Q = 2**252 + 27742317777372353535851937790883648493


def _inv(x):
    return pow(x, P - 2, P)


D = -121665 * _inv(121666) % P
SQRT_M1 = pow(2, (P - 1) // 4, P)


def _add(a, b):
    x = (a[1] - a[0]) * (b[1] - b[0]) % P
    y = (a[1] + a[0]) * (b[1] + b[0]) % P
    c = 2 * a[3] * b[3] * D % P
    d = 2 * a[2] * b[2] % P
    e, f, g, h = y - x, d - c, d + c, y + x
    return (e * f % P, g * h % P, f * g % P, e * h % P)


def _mul(s, point):
    out = (0, 1, 1, 0)
    while s > 0:
        if s & 1:
            out = _add(out, point)
        point = _add(point, point)
        s >>= 1
    return out


def _equal(a, b):
    return (a[0] * b[2] - b[0] * a[2]) % P == 0 and (a[1] * b[2] - b[1] * a[2]) % P == 0


def _recover_x(y, sign):
    if y >= P:
        return None
    x2 = (y * y - 1) * _inv(D * y * y + 1) % P
    if x2 == 0:
        return None if sign else 0
    x = pow(x2, (P + 3) // 8, P)
    if (x * x - x2) % P != 0:
        x = x * SQRT_M1 % P
    if (x * x - x2) % P != 0:
        return None
    if (x & 1) != sign:
        x = P - x
    return x


_GY = 4 * _inv(5) % P
_GX = _recover_x(_GY, 0)
G = (_GX, _GY, 1, _GX * _GY % P)


def _decompress(data):
    if len(data) != 32:
        return None
    y = int.from_bytes(data, "little")
    sign = y >> 255
    y &= (1 << 255) - 1
    x = _recover_x(y, sign)
    return None if x is None else (x, y, 1, x * y % P)


def ed25519_verify(public, message, signature):
    if len(public) != 32 or len(signature) != 64:
        return False
    a = _decompress(public)
    r = _decompress(signature[:32])
    if a is None or r is None:
        return False
    s = int.from_bytes(signature[32:], "little")
    if s >= Q:
        return False
    h = int.from_bytes(hashlib.sha512(signature[:32] + public + message).digest(), "little") % Q
    return _equal(_mul(s, G), _add(r, _mul(h, a)))


# --- C2SP signed notes and checkpoints ---------------------------------------------------------


class Invalid(Exception):
    """The input is well-formed enough to judge, and it does not verify."""


def key_id(name, public):
    return hashlib.sha256(name.encode() + b"\n\x01" + public).digest()[:4]


def parse_vkey(text):
    """`<name>+<8 hex key id>+<base64(0x01 || public key)>`."""
    # The name and the key id hold no "+"; the base64 key may.
    parts = text.strip().split("+", 2)
    if len(parts) != 3:
        raise ValueError(f"not a verifier key: {text!r}")
    name, hex_id, b64 = parts
    raw = base64.b64decode(b64, validate=True)
    if len(raw) != 33 or raw[0] != 1:
        raise ValueError(f"verifier key {name}: not an Ed25519 key")
    public = raw[1:]
    if key_id(name, public).hex() != hex_id.lower():
        raise ValueError(f"verifier key {name}: its key id does not match its key")
    return name, public


def open_note(note, vkeys):
    """The note's text, if a given key signed it (C2SP signed-note rules)."""
    split = note.rfind("\n\n")
    if split < 0:
        raise Invalid("the checkpoint is not a signed note (no blank line before its signatures)")
    text, signatures = note[: split + 1], note[split + 2 :]
    verified = False
    for line in signatures.splitlines():
        if not line.startswith("\u2014 "):
            raise Invalid(f"malformed signature line {line!r}")
        name, _, b64 = line[2:].rpartition(" ")
        raw = base64.b64decode(b64)
        if len(raw) < 5:
            raise Invalid("a signature line is too short")
        for vname, public in vkeys:
            if vname == name and raw[:4] == key_id(vname, public):
                if len(raw) != 68 or not ed25519_verify(public, text.encode(), raw[4:]):
                    raise Invalid(f"bad signature by {name}")
                verified = True
    if not verified:
        raise Invalid("no signature by a given verifier key")
    return text


def parse_checkpoint(text):
    lines = text.split("\n")
    if len(lines) < 4:
        raise Invalid("a checkpoint has an origin, a size and a root")
    origin, size, root = lines[0], lines[1], base64.b64decode(lines[2], validate=True)
    if not size.isdigit() or (len(size) > 1 and size[0] == "0") or len(root) != 32:
        raise Invalid("malformed checkpoint size or root")
    return origin, int(size), root


# --- RFC 9162 inclusion ------------------------------------------------------------------------


def leaf_hash(entry):
    return hashlib.sha256(b"\x00" + entry).digest()


def node_hash(left, right):
    return hashlib.sha256(b"\x01" + left + right).digest()


def verify_inclusion(leaf, index, size, proof, root):
    """RFC 9162, section 2.1.3.2."""
    if index >= size:
        raise Invalid(f"index {index} is not below the tree size {size}")
    fn, sn, r = index, size - 1, leaf
    for p in proof:
        if sn == 0:
            raise Invalid("the inclusion proof is too long")
        if fn & 1 or fn == sn:
            r = node_hash(p, r)
            if not fn & 1:
                while not fn & 1 and fn != 0:
                    fn >>= 1
                    sn >>= 1
        else:
            r = node_hash(r, p)
        fn >>= 1
        sn >>= 1
    if sn != 0 or r != root:
        raise Invalid("the inclusion proof does not lead to the checkpoint's root")


def parse_receipt(text):
    """c2sp.org/tlog-proof@v1: header, optional extra line, index, proof hashes, blank, note."""
    lines = text.split("\n")
    if lines[0] != "c2sp.org/tlog-proof@v1":
        raise ValueError("not a c2sp.org/tlog-proof@v1 receipt")
    i = 1
    if lines[i].startswith("extra "):
        i += 1
    if not lines[i].startswith("index "):
        raise ValueError("the receipt has no index line")
    index = int(lines[i][len("index ") :])
    proof = []
    i += 1
    while lines[i] != "":
        proof.append(base64.b64decode(lines[i], validate=True))
        i += 1
    return index, proof, "\n".join(lines[i + 1 :])


# --- Personal values ---------------------------------------------------------------------------


def commitment(salt, field, value):
    f = field.encode()
    return hashlib.sha256(salt + len(f).to_bytes(4, "big") + f + value.encode()).digest()


def check_personal(entry, given):
    record = json.loads(entry)
    committed = record.get("personal", {})
    if given.get("seq") != record.get("seq"):
        raise Invalid("the personal values are another record's")
    fields = given.get("fields", {})
    for field, opening in fields.items():
        if field not in committed:
            raise Invalid(f"the record commits to no field {field!r}")
        if commitment(bytes.fromhex(opening["salt"]), field, opening["value"]) != bytes.fromhex(committed[field]):
            raise Invalid(f"the value given for {field!r} does not match its commitment")
    if given.get("erased") and not fields and committed:
        return f"personal values: erased: {', '.join(sorted(committed))}"
    if not given.get("erased") and len(fields) == len(committed):
        return f"personal values: all {len(fields)} verified against their commitments"
    raise Invalid("the personal values are partial: neither every committed field nor an erasure")


def main(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    receipt = sub.add_parser("receipt", help="verify a tlog-proof receipt and its entry")
    receipt.add_argument("--vkey", action="append", required=True)
    receipt.add_argument("--receipt", required=True)
    receipt.add_argument("--entry", required=True)
    receipt.add_argument("--personal")
    args = parser.parse_args(argv)
    try:
        vkeys = [parse_vkey(v) for v in args.vkey]
        with open(args.receipt, encoding="utf-8") as f:
            index, proof, note = parse_receipt(f.read())
        with open(args.entry, "rb") as f:
            entry = f.read()
        given = None
        if args.personal:
            with open(args.personal, encoding="utf-8") as f:
                given = json.load(f)
    except (OSError, ValueError, IndexError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        origin, size, root = parse_checkpoint(open_note(note, vkeys))
        verify_inclusion(leaf_hash(entry), index, size, proof, root)
        print(f"valid: entry {index} is in {origin} at tree size {size}")
        if given is not None:
            print(check_personal(entry, given))
    except (Invalid, ValueError, KeyError, TypeError) as e:
        print(f"invalid: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
