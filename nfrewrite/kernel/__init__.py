"""The kernel shell: thin code around the core that talks to the kernel.

``queue`` (the NetfilterQueue loop, with ``nfnl``'s own nfnetlink messages for what NetfilterQueue
lacks), ``prefilter`` + ``ruletext`` (the rules' matches -> iptables rule text, pure) and
``firewall`` (that text into the kernel with iptables-restore), ``netsetup`` (bridges, ports,
sysctls and offloads over pyroute2).
"""
