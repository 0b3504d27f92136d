"""`fvl store verify STORE [--repair]`: check every shard of a feature store against the digest recorded
when it was written, and set damaged shards aside so that the same `fvl capture` re-captures their items.

Exit status: 0 when the store is sound (or was repaired), 1 when damage was found and not repaired, 2 for
a refused input.
"""
from __future__ import annotations

import json


def register(sub) -> None:
    p = sub.add_parser("store", help="check and repair a feature store")
    actions = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    v = actions.add_parser("verify", help="verify every shard's digest; --repair sets damaged shards aside")
    v.add_argument("store", metavar="STORE", help="a feature store directory written by `fvl capture`")
    v.add_argument("--repair", action="store_true",
                   help="move damaged shards to STORE/damaged/ and drop their items from the index, so that "
                        "rerunning the same `fvl capture` captures exactly them again")
    v.add_argument("--json", action="store_true", help="print a JSON report")
    p.set_defaults(func=run)


def run(args) -> int:
    from workbench.commands._common import UserError
    from workbench.data.files import describe_os_error
    from workbench.store import FeatureStore, StoreError, verify_store

    try:
        report = verify_store(FeatureStore(args.store, verify=False), repair=args.repair)
    except StoreError as exc:
        raise UserError(f"{args.store}: {exc}") from exc
    except OSError as exc:
        raise UserError(f"{args.store}: {describe_os_error(exc)}") from exc
    if args.json:
        print(json.dumps(report))
    else:
        _print(args.store, report)
    return 0 if not report["damaged"] or report["repaired"] else 1


def _print(store: str, report: dict) -> None:
    damaged = report["damaged"]
    print(f"{store}: {report['items']} items in {report['shards']} shards, {report['failed']} failed items; "
          f"{len(damaged)} damaged shards")
    for d in damaged:
        print(f"  {d['shard']}: {d['problem']} ({d['items']} items)")
    if damaged and report["repaired"]:
        lost = sum(d["items"] for d in damaged)
        print(f"repaired: damaged shards moved to {store}/damaged/; rerun the same `fvl capture` command to capture "
              f"the {lost} items again")
    elif damaged:
        print("rerun with --repair, then rerun the same `fvl capture` command to capture those items again")
