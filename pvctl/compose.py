"""``pviommu compose endpoints``: where a docker-compose stack's services are
and their tokens, for host scripts (the endpoints format of ``run --keep``).

    docker-compose -p ci42 -f docker-compose.yml -f deploy/docker/compose.ports.yml up -d
    pviommu compose endpoints -p ci42 -o endpoints.json
    python -c 'from pviommu.client import System; print(System.from_endpoints("endpoints.json").guests)'
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from pathlib import Path

from pvctl import exitcodes
from pviommu.client.endpoints import from_compose
from pviommu.client.errors import ClientError
from pviommu.rpc.client import print_waiting


def default_project() -> str:
    """docker-compose v1's default: the folder name, lower case, alphanumerics only."""
    return re.sub(r"[^a-z0-9]", "", Path.cwd().name.lower())


def run_compose(args: argparse.Namespace) -> int:
    project = args.project_name or os.environ.get("COMPOSE_PROJECT_NAME") or default_project()
    try:
        ep = from_compose(project, prefer_published=not args.container_ips, wait=args.wait, on_wait=print_waiting)
    except ClientError as exc:
        print(f"pviommu compose endpoints: {exc}", file=sys.stderr)
        return exitcodes.CONNECT
    if args.output:
        ep.write(args.output)
        print(f"endpoints of compose project {project!r} in {args.output}: hypervisor {ep.hypervisor.address}, "
              f"{len(ep.guests)} guests, {len(ep.devices)} devices", file=sys.stderr)
    else:
        print(json.dumps(ep.to_json(), indent=2))
    return exitcodes.OK
