"""The pip requirements of the Home Assistant integrations scripts/ha-real.sh loads.

    ha_requirements.py WHEEL INTEGRATION...

Reads each integration's manifest.json from HA's wheel and follows its `dependencies`, printing
every pinned requirement once: HA can then run with --skip-pip.
"""
import json
import sys
import zipfile


def main():
    wheel = zipfile.ZipFile(sys.argv[1])
    todo, seen, reqs = list(sys.argv[2:]), set(), []
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        try:
            manifest = json.loads(wheel.read(f"homeassistant/components/{name}/manifest.json"))
        except KeyError:
            continue
        todo += manifest.get("dependencies", [])
        for r in manifest.get("requirements", []):
            if r not in reqs:
                reqs.append(r)
    print("\n".join(reqs))


if __name__ == "__main__":
    main()
