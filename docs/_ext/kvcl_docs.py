"""Sphinx helpers for the kvcl book (loaded through ``sphinx.local_extensions`` in _config.yml).

Re-export aliases
-----------------
kvcl re-exports names from the module that defines them (``kvcl.Device`` is
``kvcl.runtime.Device``, ``kvcl.paging.PagedBookkeeping`` is
``kvcl.paging.sequences.PagedBookkeeping``), and its docstrings use the short names. The API
reference documents every object once, where it is defined, so a reference to the short name
would not resolve. This ``missing-reference`` handler resolves a ``py`` reference to a
``kvcl.*`` name that is not documented to the ONE documented object inside the same package
path with the same trailing name (``kvcl.<...>.Device``). If there are none or several, the
reference stays unresolved and ``-n`` reports it, as it should.
"""

from __future__ import annotations

from sphinx.util.nodes import make_refnode


def _full_names(node) -> list[str]:
    target = node.get("reftarget", "")
    module = node.get("py:module") or ""
    cls = node.get("py:class") or ""
    names = []
    if module and cls:
        names.append(f"{module}.{cls}.{target}")
    if module:
        names.append(f"{module}.{target}")
    names.append(target)
    return [n for n in names if n.startswith("kvcl.") or n == "kvcl"]


def _find_alias(objects, name: str):
    parts = name.split(".")
    # longest suffix first: kvcl.paging.PagedBookkeeping.plan -> "PagedBookkeeping.plan" in kvcl.paging.*
    for i in range(len(parts) - 1, 0, -1):
        package, suffix = ".".join(parts[:i]), ".".join(parts[i:])
        found = {n for n in objects if n.startswith(package + ".") and n.endswith("." + suffix)}
        # a class documented with :canonical: appears twice; keep the names, not the entries
        entries = {(objects[n].docname, objects[n].node_id) for n in found}
        if len(entries) == 1:
            return objects[sorted(found)[0]]
        if len(entries) > 1:
            return None
    return None


def resolve_reexport(app, env, node, contnode):
    if node.get("refdomain") != "py":
        return None
    objects = env.get_domain("py").objects
    for name in _full_names(node):
        if name in objects:
            return None  # Sphinx resolves it itself
        entry = _find_alias(objects, name)
        if entry is not None:
            return make_refnode(app.builder, node["refdoc"], entry.docname, entry.node_id, contnode, name)
    if node.get("reftype") == "mod":
        modules = env.get_domain("py").modules
        target = node.get("reftarget", "")
        if target in modules:
            mod = modules[target]
            return make_refnode(app.builder, node["refdoc"], mod.docname, mod.node_id, contnode, target)
    return None


def setup(app):
    app.connect("missing-reference", resolve_reexport)
    return {"parallel_read_safe": True, "parallel_write_safe": True, "version": "1"}
