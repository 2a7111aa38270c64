"""Authenticated transport and multiplexed RPC on trio (the only layer that
touches sockets). See DESIGN.md, 'Layers'."""

from ._ca import NodeCredentials as NodeCredentials
from ._ca import SwarmCA as SwarmCA
from ._ca import peer_id_from_certificate as peer_id_from_certificate
from ._identity import Identity as Identity
from ._identity import peer_id_from_public_key as peer_id_from_public_key
from ._identity import short_peer_id as short_peer_id
from ._identity import verify_signature as verify_signature
from ._tls import Security as Security
