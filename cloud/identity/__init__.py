"""Device and coordinator identities on MQTT: a fleet CA (ca.py), hashed passwords
(passwords.py), ACLs generated from the topic tree (acl.py), the credential records under
FLEET_HOME/keys (store.py), the broker files written from them (material.py) and their
application to a running broker (applier.py)."""

from edgefleet.cloud.identity.acl import COORDINATOR_USER, coordinator_acl, device_acl
from edgefleet.cloud.identity.applier import CredentialApplier
from edgefleet.cloud.identity.ca import FleetCA, IssuedCert
from edgefleet.cloud.identity.material import BrokerAuth, write_broker_material
from edgefleet.cloud.identity.passwords import hash_password, new_password, verify_password
from edgefleet.cloud.identity.store import DeviceCredential, IdentityStore

__all__ = [
    "COORDINATOR_USER",
    "BrokerAuth",
    "CredentialApplier",
    "DeviceCredential",
    "FleetCA",
    "IdentityStore",
    "IssuedCert",
    "coordinator_acl",
    "device_acl",
    "hash_password",
    "new_password",
    "verify_password",
    "write_broker_material",
]
