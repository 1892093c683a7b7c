"""Files -> objects: ``nfrewrite.toml`` and ``rules/*.toml`` become a Config and a compiled RuleSet.

``settings`` (the config file, and ``load_all``: config plus rules), ``rulefiles`` (rule files),
``tomlfile`` + ``tomlpos`` (a TOML file read safely, with every key's position), ``diagnostics``
(``path:line:col: error: text`` and a caret), ``filesafety`` (ownership and permissions, opened
component by component), ``ifname`` (the one interface-name check), ``examples`` (each rule's
examples run through the engine by ``nfrewrite check``). Reads files; talks to nothing else.
"""
