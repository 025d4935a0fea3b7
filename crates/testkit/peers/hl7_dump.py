"""Dump HL7 v2 messages as parsed by the python `hl7` library, for cross-checking.

Usage: hl7_dump.py ENCODING FILE...   (ENCODING is a Python codec name)
Prints one JSON object per file: {"segments": [{"id": "PID", "fields": [...]}]}, where each
field is repetitions -> components -> subcomponents of raw strings (python `hl7` keeps
escape sequences as they are). Trailing empty values are trimmed, as passerelle does.
"""
import json
import sys

import hl7


def trim(values, empty):
    while values and empty(values[-1]):
        values.pop()
    return values


def field_tree(field):
    if isinstance(field, str):
        reps = [[[field]]]
    else:
        reps = []
        for rep in field:
            if isinstance(rep, str):
                reps.append([[rep]])
                continue
            comps = []
            for comp in rep:
                comps.append([comp] if isinstance(comp, str) else [str(s) for s in comp])
            reps.append(comps)
    for rep in reps:
        for comp in rep:
            trim(comp, lambda s: s == "")
        trim(rep, lambda c: not c)
    return trim(reps, lambda r: not r)


def main():
    encoding = sys.argv[1]
    for path in sys.argv[2:]:
        with open(path, "rb") as f:
            text = f.read().decode(encoding)
        message = hl7.parse(text)
        segments = []
        for segment in message:
            fields = [field_tree(f) for f in segment[1:]]
            segments.append({"id": str(segment[0]), "fields": trim(fields, lambda f: not f)})
        print(json.dumps({"segments": segments}, ensure_ascii=False))


if __name__ == "__main__":
    main()
