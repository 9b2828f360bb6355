#!/usr/bin/env python3
"""An independent verifier of Tally receipts, written from the formats alone (docs/formats.md,
docs/privacy.md), with Python's standard library only: no Tally code, no third-party package.

    tally_verify.py receipt --vkey V [--vkey V2] --receipt R.tlog-proof --entry R.entry [--personal P.json]
    tally_verify.py export --vkey V [--vkey V2] EXPORT.json

`receipt` checks, in order:

1. The receipt's checkpoint is a C2SP signed note carrying a valid Ed25519 signature by one of
   the given verifier keys whose name is the checkpoint's origin (a signature by another key is
   ignored; a given key whose signature fails rejects the note). One key signs every tenant's
   checkpoints under a name per tenant: the name is what binds a signature to a tenant's log.
2. The entry is at `index` in that checkpoint's tree: RFC 9162 leaf hash and inclusion proof.
3. With --personal (the ledger's `GET /v1/tenants/{tenant}/records/{seq}/personal` answer): every
   value opens its commitment in the entry's `personal` member,
   SHA-256(salt ‖ u32be(len(field)) ‖ field ‖ value); either every committed field is given, or
   none and the answer says `erased`.

`export` checks an audit export (`GET /v1/tenants/{tenant}/audit-export`, saved as JSON;
docs/formats.md, "The audit export's range proof"):

0. The file: no member repeated in any object, no unknown top-level member.
1. The checkpoint as above, its origin ending in `/t/<tenant_id>`, its size `tree_size`.
2. The entries' leaf hashes, with `range_proof`, rebuild the checkpoint's root over
   `[from_seq, to_seq + 1)`: they are the log's entries of exactly that range.
3. Each record's personal values in `personal` open its commitments, all of them or none; a
   record without them is erased if an `erasure` record in the export names it, else withheld.
4. Each seq has exactly one row, and each row is, column by column, what its entry gives
   (docs/formats.md, "Rows from entries").
5. `complete`, `missing_seqs`, `mismatched_seqs`, `truncated` and `next_from_seq` agree.

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
    """The note's text and the names of the given keys whose signatures verified, if any did
    (C2SP signed-note rules)."""
    split = note.rfind("\n\n")
    if split < 0:
        raise Invalid("the checkpoint is not a signed note (no blank line before its signatures)")
    text, signatures = note[: split + 1], note[split + 2 :]
    verified = set()
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
                verified.add(name)
    if not verified:
        raise Invalid("no signature by a given verifier key")
    return text, verified


def open_checkpoint(note, vkeys):
    """(origin, size, root) of a checkpoint signed by a given key whose name is its origin: one
    Ed25519 key signs every tenant's checkpoints, under a key name per tenant, so the name is
    what ties a signature to a tenant's log."""
    text, signed_by = open_note(note, vkeys)
    origin, size, root = parse_checkpoint(text)
    if origin not in signed_by:
        raise Invalid(f"the checkpoint's origin {origin} is not the name of a key that signed it")
    return origin, size, root


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


# --- Audit exports ------------------------------------------------------------------------------


def split(n):
    """The largest power of two strictly less than n (n >= 2)."""
    k = 1
    while k << 1 < n:
        k <<= 1
    return k


def root_from_range(leaves, lo, size, proof):
    """docs/formats.md, "Verifying it": the root the leaves of [lo, lo + len) and the proof give."""
    hi = lo + len(leaves)
    if not leaves or hi > size:
        raise Invalid("the range is empty or beyond the tree")
    leaves, proof = list(leaves), list(proof)

    def walk(a, b):
        if b <= lo or a >= hi:
            if not proof:
                raise Invalid("the range proof is too short")
            return proof.pop(0)
        if b - a == 1:
            return leaves.pop(0)
        k = split(b - a)
        left = walk(a, a + k)
        return node_hash(left, walk(a + k, b))

    root = walk(0, size)
    if proof or leaves:
        raise Invalid("the range proof has hashes left over")
    return root


TIME = None  # compiled on first use


def micros(text, digits):
    """An RFC 3339 UTC time as records and rows write it (ASCII, four-digit year, at most
    `digits` fraction digits) in microseconds since the epoch, a finer fraction cut toward zero
    as the projection cuts it."""
    import datetime
    import re

    global TIME
    if TIME is None:
        TIME = re.compile(r"([0-9]{4})-([0-9]{2})-([0-9]{2})T([0-9]{2}):([0-9]{2}):([0-9]{2})(?:\.([0-9]{1,9}))?Z", re.ASCII)
    m = TIME.fullmatch(text) if isinstance(text, str) else None
    if not m or (m.group(7) and len(m.group(7)) > digits):
        raise Invalid(f"not a UTC time: {text!r}")
    at = datetime.datetime(*(int(g) for g in m.groups()[:6]), tzinfo=datetime.timezone.utc)
    seconds = (at - datetime.datetime(1970, 1, 1, tzinfo=datetime.timezone.utc)) // datetime.timedelta(seconds=1)
    nanos = seconds * 1_000_000_000 + int((m.group(7) or "").ljust(9, "0"))
    return nanos // 1000 if nanos >= 0 else -(-nanos // 1000)


TIME_COLUMNS = ("occurred_at", "kafka_timestamp")
EVENT_TYPES = ("event", "conflict")
EXPORT_MEMBERS = {
    "tenant_id", "from_seq", "to_seq", "truncated", "next_from_seq", "tree_size", "complete",
    "missing_seqs", "mismatched_seqs", "checkpoint", "range_proof", "entries", "rows", "personal",
}


def is_int(x):
    """A JSON integer: not a boolean, not a float."""
    return type(x) is int


def no_repeats(pairs):
    """`object_pairs_hook` for json.load: refuse an object that repeats a member (a reader
    taking the first of two would see other content than one taking the last)."""
    obj = {}
    for key, value in pairs:
        if key in obj:
            raise Invalid(f"the member {key!r} is repeated")
        obj[key] = value
    return obj


def expected_row(seq, entry, opened):
    """The row an entry gives (docs/formats.md, "Rows from entries"); `opened` is the record's
    personal values (field -> value), or None when not given. Absent keys are null columns."""
    record = json.loads(entry, object_pairs_hook=no_repeats)
    if record.get("seq") != seq or not is_int(record.get("seq")):
        raise Invalid(f"entry {seq} says it is seq {record.get('seq')!r}")
    row = {"seq": seq, "leaf_hash": leaf_hash(entry).hex()}
    if record.get("type") not in EVENT_TYPES:
        row["record_type"] = record.get("type")
        if "at" in record:
            row["occurred_at"] = micros(record["at"], 9)
        row["detail"] = entry.decode("utf-8", "replace")
        return row
    event = dict(record["event"])
    conflict = record["type"] == "conflict"
    row["record_type"] = record["type"]
    attributes = dict(event.get("attributes", {}))
    for field in record.get("personal", {}):
        value = "erased" if opened is None else opened[field]
        if field == "actor_id":
            event["actor_id"] = value
        elif field.startswith("attributes."):
            attributes[field[len("attributes.") :]] = value
    row["occurred_at"] = micros(event["occurred_at"], 9)
    for column in ("event_id", "kind", "decision", "reason_code", "agent_id", "actor_id", "workspace_id", "task_id"):
        if event.get(column) is not None:
            row[column] = event[column]
    if event.get("delegation"):
        row["delegation"] = event["delegation"]
    for column in ("action", "policy_profile", "quota_class"):
        if event.get(column) is not None:
            row[column] = event[column]
    usage, cost = event.get("usage"), event.get("cost")
    if usage:
        row["input_tokens"], row["output_tokens"] = usage["input_tokens"], usage["output_tokens"]
    if cost:
        row["cost_micros"], row["currency"] = cost["amount_micros"], cost["currency"]
    charge = None if conflict else record.get("charge")
    if charge is None and not conflict and cost:
        # A record from before rating: its cost stands for its charge, in its UTC month.
        charge = {"micros": cost["amount_micros"], "currency": cost["currency"], "basis": "event", "period": event["occurred_at"][:8] + "01"}
    if charge:
        row["charge_micros"], row["charge_currency"], row["charge_basis"] = charge["micros"], charge["currency"], charge["basis"]
        if charge.get("catalog_seq") is not None:
            row["catalog_seq"] = charge["catalog_seq"]
        row["billing_period"] = charge["period"]
        if charge.get("corrects") is not None:
            row["corrects_period"] = charge["corrects"]
    if event.get("reservation_id") is not None:
        row["reservation_id"] = event["reservation_id"]
    if attributes:
        row["attributes"] = dict(sorted(attributes.items()))
    source = record.get("source", {})
    if source.get("kind") == "kafka":
        row["kafka_partition"], row["kafka_offset"] = source["partition"], source["offset"]
        if source.get("timestamp_ms") is not None:
            row["kafka_timestamp"] = source["timestamp_ms"] * 1000
    if conflict:
        row["detail"] = json.dumps({"conflicts_with_seq": record["conflicts_with_seq"]}, separators=(",", ":"))
    return row


def same(got, want):
    """JSON equality that tells integers from booleans and floats."""
    if type(got) is not type(want):
        return False
    if isinstance(want, dict):
        return set(got) == set(want) and all(same(got[k], v) for k, v in want.items())
    if isinstance(want, list):
        return len(got) == len(want) and all(same(g, w) for g, w in zip(got, want))
    return got == want


def same_row(got, want):
    """Whether a row equals the expected one: the same columns, times (at most microseconds, as
    the projection keeps them) compared as instants."""
    if not isinstance(got, dict) or set(got) != set(want):
        return False
    for column, value in want.items():
        if column in TIME_COLUMNS:
            if micros(got[column], 6) != value:
                return False
        elif not same(got[column], value):
            return False
    return True


def seq_key(text):
    """A `personal` member's name: a seq in canonical decimal."""
    if not isinstance(text, str) or not text.isascii() or not text.isdigit() or (len(text) > 1 and text[0] == "0"):
        raise Invalid(f"personal: {text!r} is not a seq")
    return int(text)


def verify_export(export, vkeys):
    if not isinstance(export, dict) or set(export) - EXPORT_MEMBERS or not {"tenant_id", "checkpoint", "entries", "rows"} <= set(export):
        raise Invalid(f"not an audit export: members {sorted(set(export) - EXPORT_MEMBERS) if isinstance(export, dict) else ''} unknown, or some missing")
    tenant = export["tenant_id"]
    if not isinstance(tenant, str) or not tenant or "/" in tenant:
        raise Invalid(f"tenant_id {tenant!r} is not a tenant id")
    origin, size, root = open_checkpoint(export["checkpoint"], vkeys)
    if not origin.endswith(f"/t/{tenant}"):
        raise Invalid(f"the checkpoint's origin {origin} is not tenant {tenant}'s log")
    lo, hi, tree_size = export["from_seq"], export["to_seq"], export["tree_size"]
    if not (is_int(lo) and is_int(hi) and is_int(tree_size)):
        raise Invalid("from_seq, to_seq and tree_size must be integers")
    if tree_size != size:
        raise Invalid(f"tree_size is {tree_size}, the checkpoint's size is {size}")
    if not (0 <= lo <= hi < size):
        raise Invalid(f"the range {lo}..={hi} is not within the checkpointed log of {size} records")
    entries = [base64.b64decode(e, validate=True) for e in export["entries"]]
    if len(entries) != hi - lo + 1:
        raise Invalid(f"the range {lo}..={hi} needs {hi - lo + 1} entries, the export has {len(entries)}")
    proof = [base64.b64decode(h, validate=True) for h in export["range_proof"]]
    if any(len(h) != 32 for h in proof):
        raise Invalid("a range proof hash is not 32 bytes")
    if root_from_range([leaf_hash(e) for e in entries], lo, size, proof) != root:
        raise Invalid("the entries with the range proof do not rebuild the checkpoint's root")
    # The entries are the log's: now the personal values and the rows, against them.
    personal = {seq_key(seq): fields for seq, fields in export.get("personal", {}).items()}
    if any(not lo <= seq <= hi for seq in personal):
        raise Invalid("personal values are given for a seq outside the range")
    records = [json.loads(e, object_pairs_hook=no_repeats) for e in entries]
    named = set()
    for record in records:
        if record.get("type") == "erasure":
            named.update(record["seqs"])
    rows = {}
    for row in export["rows"]:
        if not isinstance(row, dict) or not is_int(row.get("seq")):
            raise Invalid("a row has no integer seq")
        if row["seq"] in rows:
            raise Invalid(f"seq {row['seq']} has several rows")
        rows[row["seq"]] = row
    opened_count = erased_count = withheld_count = 0
    for seq, entry, record in zip(range(lo, hi + 1), entries, records):
        committed = record.get("personal", {}) if record.get("type") in EVENT_TYPES else {}
        fields = personal.get(seq)
        opened = None
        if fields is not None:
            if not committed or set(fields) != set(committed):
                raise Invalid(f"seq {seq}: the personal values given are not every field the record commits to")
            for field, opening in fields.items():
                if not isinstance(opening, dict) or set(opening) != {"value", "salt"} or not isinstance(opening["value"], str):
                    raise Invalid(f"seq {seq}: the opening of {field!r} is not a value and a salt")
                salt = opening["salt"]
                if not isinstance(salt, str) or len(salt) != 32 or any(c not in "0123456789abcdef" for c in salt):
                    raise Invalid(f"seq {seq}: the salt of {field!r} is not 32 lowercase hex digits")
                if commitment(bytes.fromhex(salt), field, opening["value"]) != bytes.fromhex(committed[field]):
                    raise Invalid(f"seq {seq}: the value given for {field!r} does not match its commitment")
            opened = {field: o["value"] for field, o in fields.items()}
            opened_count += 1
        elif committed and seq in named:
            erased_count += 1
        elif committed:
            withheld_count += 1
        if seq not in rows:
            raise Invalid(f"seq {seq} has no row")
        if not same_row(rows.pop(seq), expected_row(seq, entry, opened)):
            raise Invalid(f"the row of seq {seq} is not what its entry gives")
    if rows:
        raise Invalid(f"a row of seq {min(rows)} is outside the range")
    truncated, after = export["truncated"], export["next_from_seq"]
    if truncated is True and (not is_int(after) or after != hi + 1) or truncated is False and after is not None or type(truncated) is not bool:
        raise Invalid("truncated and next_from_seq disagree")
    if export["complete"] is not True or export["missing_seqs"] != [] or export["mismatched_seqs"] != []:
        raise Invalid("the export says it is incomplete, yet every row matches its entry")
    withheld = f", {withheld_count} not given (no erasure record in the export names them)" if withheld_count else ""
    return (
        f"valid: seqs {lo}..={hi} of {origin} at tree size {size}: {len(entries)} entries in the checkpoint's tree, "
        f"each row what its entry gives; personal values: {opened_count} records verified, {erased_count} erased{withheld}"
    )


def main(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    receipt = sub.add_parser("receipt", help="verify a tlog-proof receipt and its entry")
    receipt.add_argument("--vkey", action="append", required=True)
    receipt.add_argument("--receipt", required=True)
    receipt.add_argument("--entry", required=True)
    receipt.add_argument("--personal")
    export = sub.add_parser("export", help="verify an audit export")
    export.add_argument("--vkey", action="append", required=True)
    export.add_argument("export")
    args = parser.parse_args(argv)
    try:
        vkeys = [parse_vkey(v) for v in args.vkey]
        if args.command == "export":
            with open(args.export, encoding="utf-8") as f:
                document = json.load(f, object_pairs_hook=no_repeats)
        else:
            with open(args.receipt, encoding="utf-8") as f:
                index, proof, note = parse_receipt(f.read())
            with open(args.entry, "rb") as f:
                entry = f.read()
            given = None
            if args.personal:
                with open(args.personal, encoding="utf-8") as f:
                    given = json.load(f)
    except (OSError, ValueError, IndexError, Invalid) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        if args.command == "export":
            print(verify_export(document, vkeys))
            return 0
        origin, size, root = open_checkpoint(note, vkeys)
        verify_inclusion(leaf_hash(entry), index, size, proof, root)
        print(f"valid: entry {index} is in {origin} at tree size {size}")
        if given is not None:
            print(check_personal(entry, given))
    except (Invalid, ValueError, KeyError, TypeError, AttributeError, IndexError) as e:
        print(f"invalid: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
