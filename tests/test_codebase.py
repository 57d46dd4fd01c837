

def test_no_module_level_state_keyed_by_session() -> None:
    """Per-session state lives on the Session (``KeysInUse``), emptied with it: no module-level registry of it."""
    found = []
    for path, tree in _modules():
        for node in tree.body:
            if isinstance(node, ast.AnnAssign | ast.Assign):
                text = ast.unparse(node)
                if "Session" in text and ("Dictionary" in text or "dict[" in text or "{" in text):
                    found.append(f"{path} (line {node.lineno}): {text}")
    assert found == []
