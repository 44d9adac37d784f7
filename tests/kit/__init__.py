"""The test kits, one importable package (``from tests.kit.hvkit import HvEnv``):

* ``core_env``, ``native_env``: a nested IOMMU system in process (host, stage 1 and 2, unit);
* ``hvkit``: real hypervisor servers on 127.0.0.1:0 and guests speaking to them;
* ``guest_env``: a hypervisor plus a fake device for the guest agent's suites;
* ``rig``: one DSA device model over a real IOMMU unit (the device suites);
* ``inspectkit``: nested mappings for the inspection suites;
* ``hvstrategies``, ``hvlayouts``: hypercall requests drawn by hypothesis and laid out by hand (tests/abi);
* ``robustkit`` (counts, long mode, settings), ``refwalk`` (reference walker), ``dsarig`` (the
  stage-1 / descriptor rig and its isolation checks), ``descstrategies``, ``racekit``: the
  isolation / robustness fuzz rigs (also used by fuzz/).
"""
