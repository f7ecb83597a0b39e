"""The verbs backend against pyverbs' real API (Debian python3-pyverbs), by introspection.

No RDMA device exists on these machines, so nothing here posts a work request. What it checks:
every pyverbs module, class, enum and method that common/ring/verbs.py names exists, and the
keyword arguments it passes are ones those callables document.
"""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

pyverbs = pytest.importorskip("pyverbs", reason="python3-pyverbs not installed (make setup)")

SOURCE = Path(__file__).resolve().parents[1] / "common" / "ring" / "verbs.py"


def _tree():
    return ast.parse(SOURCE.read_text())


def test_every_imported_pyverbs_name_exists():
    imported = []
    for node in ast.walk(_tree()):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("pyverbs"):
            module = importlib.import_module(node.module)
            imported += [(node.module, alias.name) for alias in node.names]
            for alias in node.names:
                assert hasattr(module, alias.name), f"{node.module}.{alias.name}"
    assert len(imported) >= 10


def test_every_verbs_enum_used_exists():
    import pyverbs.enums as e

    names = {node.attr for node in ast.walk(_tree())
             if isinstance(node, ast.Attribute) and node.attr.startswith("IBV_")}
    assert {"IBV_WR_RDMA_READ", "IBV_WR_RDMA_WRITE", "IBV_WR_ATOMIC_FETCH_AND_ADD",
            "IBV_WR_ATOMIC_CMP_AND_SWP", "IBV_ACCESS_REMOTE_ATOMIC"} <= names
    missing = sorted(n for n in names if not hasattr(e, n))
    assert not missing, missing


def test_the_methods_called_on_pyverbs_objects_exist():
    from pyverbs.cq import CQ
    from pyverbs.device import Context, DeviceAttr, PortAttr
    from pyverbs.mr import MR
    from pyverbs.qp import QP, QPAttr
    from pyverbs.wr import SendWR

    for cls, members in [
        (QP, ["to_init", "to_rtr", "to_rts", "post_send", "qp_num", "close"]),
        (CQ, ["poll", "close"]),
        (MR, ["read", "write", "lkey", "rkey", "buf", "close"]),
        (SendWR, ["set_wr_rdma", "set_wr_atomic"]),
        (Context, ["query_port", "query_gid", "query_device", "close"]),
        (PortAttr, ["lid"]),
        (DeviceAttr, ["atomic_caps"]),
        (QPAttr, ["qp_access_flags", "pkey_index", "port_num", "path_mtu", "dest_qp_num",
                  "rq_psn", "max_dest_rd_atomic", "min_rnr_timer", "ah_attr", "sq_psn",
                  "timeout", "retry_cnt", "rnr_retry", "max_rd_atomic"]),
    ]:
        missing = [m for m in members if not hasattr(cls, m)]
        assert not missing, f"{cls.__name__} lacks {missing}"


@pytest.mark.parametrize("callable_path,keywords", [
    ("pyverbs.qp.QPCap", ["max_send_wr", "max_recv_wr", "max_send_sge", "max_recv_sge"]),
    ("pyverbs.qp.QPInitAttr", ["qp_type", "scq", "rcq", "cap"]),
    ("pyverbs.qp.QPAttr", ["qp_state"]),
    ("pyverbs.wr.SendWR", ["wr_id", "opcode", "num_sge", "sg", "send_flags"]),
    ("pyverbs.addr.AHAttr", ["port_num", "is_global", "grh", "dlid"]),
    ("pyverbs.addr.GlobalRoute", ["dgid", "sgid_index"]),
    ("pyverbs.mr.MR", ["address"]),
])
def test_keyword_arguments_match_pyverbs_docstrings(callable_path, keywords):
    module_name, name = callable_path.rsplit(".", 1)
    target = getattr(importlib.import_module(module_name), name)
    doc = target.__init__.__doc__ or ""
    missing = [k for k in keywords if f":param {k}:" not in doc]
    assert not missing, f"{callable_path} does not document {missing}"


def test_opening_a_device_that_does_not_exist_is_a_clear_error():
    from stagepool.common.ring.verbs import VerbsMemory

    with pytest.raises(Exception, match="(?i)device|mlx|found|name"):
        VerbsMemory("no_such_rdma_device", "encode", lambda ring, qp: {})
