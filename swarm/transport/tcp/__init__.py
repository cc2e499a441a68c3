"""A libp2p-free transport: TLS 1.3 over TCP, Ed25519 identities, signed records spread by gossip.

Never imports hivemind, directly or through other swarm modules (tests check this in a process
where `import hivemind` fails). Modules, bottom up: `identity` (key file, peer ids), `addresses`
(multiaddrs: the only importer of py-multiaddr), `channel` (authenticated, encrypted, framed
connections), `records` (signed records and the capped store), `loop` (the event loop thread),
`peer` (one connection's queue and messages), `node` (the gossip node, and services on connections of
their own), `allreduce` (the exact butterfly exchange of one group), `group` (matchmaking, signed
gathers, the all-reduce's driver), `state` (state download), `transport` (`TcpTransport`).
"""
