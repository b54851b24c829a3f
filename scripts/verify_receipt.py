#!/usr/bin/env python3
"""Check a Menshen deletion receipt with PyNaCl (libsodium), written from docs/privacy.md alone.

It is the third-party verifier the specification promises: it rebuilds the signed bytes from
the receipt as the document says, and checks the Ed25519 signature against the key *you* give
(the gate's published `identity` key), never the key the receipt names.

  verify_receipt.py RECEIPT.json ed25519:<hex>   exit 0: genuine; 1: altered or another key
  verify_receipt.py --vectors docs/receipt-vectors.json
                                                 exit 0: every vector's bytes and signature hold
RECEIPT.json is a bare receipt or an `event/privacy` message carrying one under `receipt`.
"""
import json
import sys

from nacl.exceptions import BadSignatureError
from nacl.signing import VerifyKey

DOMAIN = b"menshen-receipt-v1\n"
# The receipt's fields in signing order (docs/privacy.md, "The signed bytes").
FIELDS = ["receipt_id", "site", "gate", "resident", "what", "key_id", "why",
          "deleted_at_ms", "signed_at_ms", "key", "signature"]


def signed_bytes(receipt):
    """The domain line, then the receipt as compact JSON in field order with `signature` empty."""
    if sorted(receipt) != sorted(FIELDS):
        raise ValueError(f"fields {sorted(receipt)} are not the receipt's {sorted(FIELDS)}")
    body = {k: ("" if k == "signature" else receipt[k]) for k in FIELDS}
    return DOMAIN + json.dumps(body, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def public_key(text):
    text = text.strip()
    raw = bytes.fromhex(text[len("ed25519:"):] if text.startswith("ed25519:") else text)
    if len(raw) != 32:
        raise ValueError("an Ed25519 public key is 32 bytes")
    return raw


def verify(receipt, key):
    """True if `receipt` is signed by `key` (32 bytes) and names that key."""
    if receipt.get("key") != "ed25519:" + key.hex():
        return False
    try:
        VerifyKey(key).verify(signed_bytes(receipt), bytes.fromhex(receipt["signature"]))
        return True
    except (BadSignatureError, ValueError):
        return False


def check_vectors(path):
    with open(path, encoding="utf-8") as f:
        doc = json.load(f)
    for v in doc["vectors"]:
        key = public_key(v["public_key"])
        receipt = v["receipt"]
        got = signed_bytes(receipt)
        if got.hex() != v["signed_bytes_hex"]:
            print(f"{v['name']}: rebuilt bytes differ from the vector's:\n  {got!r}", file=sys.stderr)
            return 1
        if not verify(receipt, key):
            print(f"{v['name']}: the signature does not verify", file=sys.stderr)
            return 1
        # Every field is covered: changing any one breaks the signature.
        for k in FIELDS[:-1]:
            t = dict(receipt)
            t[k] = t[k] + 1 if isinstance(t[k], int) else t[k] + "x"
            if verify(t, key):
                print(f"{v['name']}: a change to `{k}` still verifies", file=sys.stderr)
                return 1
        print(f"{v['name']}: ok")
    return 0


def main(argv):
    if len(argv) == 3 and argv[1] == "--vectors":
        return check_vectors(argv[2])
    if len(argv) != 3:
        print(__doc__, file=sys.stderr)
        return 2
    with open(argv[1], encoding="utf-8") as f:
        v = json.load(f)
    receipt = v.get("receipt", v)
    ok = verify(receipt, public_key(argv[2]))
    print("valid" if ok else "INVALID: altered, or not signed by this key")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv))
