"""`libpipe ca`: make a swarm CA and issue node identities signed by it."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("ca", help="manage a private swarm's certificate authority")
    actions = parser.add_subparsers(dest="ca_command", metavar="ACTION", required=True)

    init = actions.add_parser("init", help="create a swarm CA in DIR")
    init.add_argument("dir", metavar="DIR")
    init.add_argument("--name", default="libpipe swarm CA", help="the CA's common name")
    init.set_defaults(func=_init)

    issue = actions.add_parser("issue", help="issue a node identity signed by the CA in DIR")
    issue.add_argument("dir", metavar="DIR", help="the swarm CA directory")
    issue.add_argument("--name", required=True, help="the node's name (shown in its certificate)")
    issue.add_argument("--out", required=True, metavar="DIR2", help="identity directory to write")
    issue.set_defaults(func=_issue)


def _init(args: argparse.Namespace) -> int:
    from ..net import SwarmCA

    ca = SwarmCA.create(args.name)
    ca.save(args.dir)
    print(f"swarm CA written to {args.dir} (keep ca.key secret; give ca.crt to every node)")
    return 0


def _issue(args: argparse.Namespace) -> int:
    from ..net import SwarmCA

    credentials = SwarmCA.load(args.dir).issue(args.name)
    credentials.save(args.out)
    print(f"identity {credentials.peer_id} written to {args.out}")
    return 0
