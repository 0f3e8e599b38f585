"""DKIM keys the tests make once per run: an RSA one and an Ed25519 one (RFC 8463).

The private halves in the forms dkimpy signs with, the public halves as a
key record's ``p=`` holds them.
"""

from __future__ import annotations

import base64

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

RSA_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
RSA_PRIVATE = RSA_KEY.private_bytes(
    serialization.Encoding.PEM,
    serialization.PrivateFormat.TraditionalOpenSSL,
    serialization.NoEncryption(),
)
RSA_PUBLIC = base64.b64encode(
    RSA_KEY.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
).decode()
ED_KEY = ed25519.Ed25519PrivateKey.generate()
ED_PRIVATE = base64.b64encode(
    ED_KEY.private_bytes(
        serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
    )
)
ED_PUBLIC = base64.b64encode(
    ED_KEY.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
).decode()
