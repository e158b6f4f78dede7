"""Issue #5: nothing lost, nothing injected -- the fault and hostile-input suite (docs/reliability.rst)."""
