"""Known-answer tests for the WireGuard core's cryptography, against published vectors.

Sources (the values are facts copied from them; nothing else is):
* KDF1/2/3 (HKDF over HMAC-BLAKE2s): wireguard-go device/kdf_test.go ``TestKDF``.
* BLAKE2s: RFC 7693 appendix B ("abc"); the BLAKE2 reference KAT (blake2s-kat.txt), key 00..1f.
* X25519: RFC 7748 section 6.1 (Alice and Bob).
* ChaCha20-Poly1305: RFC 8439 section 2.8.2.  XChaCha20-Poly1305: draft-irtf-cfrg-xchacha-03 A.3.1.
* Ci = HASH(construction), Hi = HASH(Ci || identifier): the constants in conradludgate/rustyguard.
* Noise_IKpsk2_25519_ChaChaPoly_BLAKE2s: the cacophony test vector (as shipped in mcginty/snow's
  tests/vectors/cacophony.txt), which exercises exactly the message pattern WireGuard uses.
"""

from __future__ import annotations

import hashlib

import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from nacl.bindings import crypto_aead_xchacha20poly1305_ietf_encrypt

from wiretun.wireguard import keys, noise

H = bytes.fromhex

# wireguard-go device/kdf_test.go
KDF_VECTORS = [
    (
        "746573742d6b6579",
        "746573742d696e707574",
        "6f0e5ad38daba1bea8a0d213688736f19763239305e0f58aba697f9ffc41c633",
        "df1194df20802a4fe594cde27e92991c8cae66c366e8106aaa937a55fa371e8a",
        "fac6e2745a325f5dc5d11a5b165aad08b0ada28e7b4e666b7c077934a4d76c24",
    ),
    (
        "776972656775617264",
        "776972656775617264",
        "491d43bbfdaa8750aaf535e334ecbfe5129967cd64635101c566d4caefda96e8",
        "1e71a379baefd8a79aa4662212fcafe19a23e2b609a3db7d6bcba8f560e3d25f",
        "31e1ae48bddfbe5de38f295e5452b1909a1b4e38e183926af3780b0c1e1f0160",
    ),
    (
        "",
        "",
        "8387b46bf43eccfcf349552a095d8315c4055beb90208fb1be23b894bc2ed5d0",
        "58a0e5f6faefccf4807bff1f05fa8a9217945762040bcec2f4b4a62bdfe0e86e",
        "0ce6ea98ec548f8e281e93e32db65621c45eb18dc6f0a7ad94178610a2f7338e",
    ),
]


@pytest.mark.parametrize("key,data,t0,t1,t2", KDF_VECTORS)
def test_kdf_wireguard_go_vectors(key: str, data: str, t0: str, t1: str, t2: str) -> None:
    assert noise.kdf1(H(key), H(data)).hex() == t0
    assert [x.hex() for x in noise.kdf2(H(key), H(data))] == [t0, t1]
    assert [x.hex() for x in noise.kdf3(H(key), H(data))] == [t0, t1, t2]


def test_blake2s_vectors() -> None:
    assert noise.hash_(b"abc").hex() == "508c5e8c327c14e2e1a72ba34eeb452f37458b209ed63a294d999b4c86675982"
    assert noise.hash_(b"a", b"bc") == noise.hash_(b"abc")
    key = bytes(range(32))
    assert hashlib.blake2s(b"", key=key).hexdigest() == (
        "48a8997da407876b3d79c0d92325ad3b89cbb754d86ab71aee047ad345fd2c49"
    )
    assert hashlib.blake2s(b"\x00", key=key).hexdigest() == (
        "40d15fee7c328830166ac3f918650f807e7e01e177258cdc0a39b11f598066f1"
    )


def test_construction_and_identifier_hashes() -> None:
    ck = bytes(
        [96, 226, 109, 174, 243, 39, 239, 192, 46, 195, 53, 226, 160, 37, 210, 208,
         22, 235, 66, 6, 248, 114, 119, 245, 45, 56, 209, 152, 139, 120, 205, 54]
    )  # fmt: skip
    h = bytes(
        [34, 17, 179, 97, 8, 26, 197, 102, 105, 18, 67, 219, 69, 138, 213, 50,
         45, 156, 108, 102, 34, 147, 232, 183, 14, 225, 156, 101, 186, 7, 158, 243]
    )  # fmt: skip
    assert noise.CONSTRUCTION == b"Noise_IKpsk2_25519_ChaChaPoly_BLAKE2s"
    assert noise.IDENTIFIER == b"WireGuard v1 zx2c4 Jason@zx2c4.com"
    assert noise.INITIAL_CHAIN_KEY == ck
    assert noise.INITIAL_HASH == h


def test_x25519_rfc7748() -> None:
    alice = H("77076d0a7318a57d3c16c17251b26645df4c2f87ebc0992ab177fba51db92c2a")
    bob = H("5dab087e624a8a4b79e17f8b83800ee66f3bb1292618b6fd1c2f8b27ff88e0eb")
    assert keys.public_key(alice).hex() == "8520f0098930a754748b7ddcb43ef75a0dbf3a0d26381af4eba4a98eaa9b4e6a"
    assert keys.public_key(bob).hex() == "de9edb7d7b7dc1b4d35b61c2ece435373f8343c85b78674dadfc7e146f882b4f"
    shared = "4a5d9d5ba4ce2de1728e3bf480350f25e07e21c947d19e3376f09b3c1e161742"
    assert keys.shared_secret(alice, keys.public_key(bob)).hex() == shared
    assert keys.shared_secret(bob, keys.public_key(alice)).hex() == shared


@pytest.mark.parametrize(
    "low_order_point",
    [
        "00" * 32,  # zero
        "01" + "00" * 31,  # one
        "e0eb7a7c3b41b8ae1656e3faf19fc46ada098deb9c32b1fd866205165f49b800",  # order 8
        "5f9c95bca3508c24b1d0b1559c83ef5b04445cc4581c8e86d8224eddd09f1157",  # order 8
        "ecffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f",  # p - 1
    ],
)
def test_all_zero_shared_secret_is_rejected(low_order_point: str) -> None:
    assert keys.shared_secret(keys.generate_private_key(), H(low_order_point)) is None


def test_curve_wrappers_agree() -> None:
    # wireguard-go TestCurveWrappers: both sides compute the same secret.
    sk1, sk2 = keys.generate_private_key(), keys.generate_private_key()
    assert keys.shared_secret(sk1, keys.public_key(sk2)) == keys.shared_secret(sk2, keys.public_key(sk1))
    assert sk1[0] & 7 == 0 and sk1[31] & 0x80 == 0 and sk1[31] & 0x40


SUNSCREEN = (
    b"Ladies and Gentlemen of the class of '99: If I could offer you only one tip for the future,"
    b" sunscreen would be it."
)


def test_chacha20poly1305_rfc8439() -> None:
    key = bytes(range(0x80, 0xA0))
    nonce = H("070000004041424344454647")
    aad = H("50515253c0c1c2c3c4c5c6c7")
    expected = H(
        "d31a8d34648e60db7b86afbc53ef7ec2a4aded51296e08fea9e2b5a736ee62d63dbea45e8ca9671282fafb69da92728b"
        "1a71de0a9e060b2905d6a5b67ecd3b3692ddbd7f2d778b8c9803aee328091b58fab324e4fad675945585808b4831d7bc"
        "3ff4def08e4b7a9de576d26586cec64b6116"
        "1ae10b594f09e26a7e902ecbd0600691"
    )
    assert ChaCha20Poly1305(key).encrypt(nonce, SUNSCREEN, aad) == expected
    # WireGuard's nonce layout: 4 zero bytes then the little-endian counter.
    assert noise.NONCE.pack(0x0102030405060708) == bytes(4) + bytes([8, 7, 6, 5, 4, 3, 2, 1])
    assert noise.aead_decrypt(key, 1, noise.aead_encrypt(key, 1, b"x", b"ad"), b"ad") == b"x"
    assert noise.aead_decrypt(key, 2, noise.aead_encrypt(key, 1, b"x", b"ad"), b"ad") is None


def test_xchacha20poly1305_draft_vector() -> None:
    key = bytes(range(0x80, 0xA0))
    nonce = bytes(range(0x40, 0x58))
    aad = H("50515253c0c1c2c3c4c5c6c7")
    expected = H(
        "bd6d179d3e83d43b9576579493c0e939572a1700252bfaccbed2902c21396cbb731c7f1b0b4aa6440bf3a82f4eda7e39"
        "ae64c6708c54c216cb96b72e1213b4522f8c9ba40db5d945b11b69b982c1bb9e3f3fac2bc369488f76b2383565d3fff9"
        "21f9664c97637da9768812f615c68b13b52e"
        "c0875924c1c7987947deafd8780acf49"
    )
    assert crypto_aead_xchacha20poly1305_ietf_encrypt(SUNSCREEN, aad, nonce, key) == expected


# cacophony: Noise_IKpsk2_25519_ChaChaPoly_BLAKE2s
IKPSK2 = {
    "prologue": "4a6f686e2047616c74",
    "psk": "54686973206973206d7920417573747269616e20706572737065637469766521",
    "init_static": "e61ef9919cde45dd5f82166404bd08e38bceb5dfdfded0a34c8df7ed542214d1",
    "init_ephemeral": "893e28b9dc6ca8d611ab664754b8ceb7bac5117349a4439a6b0569da977c464a",
    "init_remote_static": "31e0303fd6418d2f8c0e78b91f22e8caed0fbe48656dcf4767e4834f701b8f62",
    "resp_static": "4a3acbfdb163dec651dfa3194dece676d437029c62a408b4c5ea9114246e4893",
    "resp_ephemeral": "bbdb4cdbd309f1a1f2e1456967fe288cadd6f712d65dc7b7793d5e63da6b375b",
    "handshake_hash": "f5191b875290abcd41347ac3622d9679688a7e980229cb937ef748336cfde0e5",
    "messages": [
        (
            "4c756477696720766f6e204d69736573",
            "ca35def5ae56cec33dc2036731ab14896bc4c75dbb07a61f879f8e3afa4c7944001e21de9f98ddd8e2ad57527207"
            "feb56253c9c94a9e496782ecfcb2a75fbcaf1b52948cc48daefe660c62119ab5000980c84831215f2441eba61654"
            "8e832985464cf17e51ee93109008399a21f7e13f",
        ),
        (
            "4d757272617920526f746862617264",
            "95ebc60d2b1fa672c1f46a8aa265ef51bfe38e7ccb39ec5be34069f144808843cb765f2caef0751b8f007572dab0"
            "322217755c0632f365717edbf34d33e87a",
        ),
        ("462e20412e20486179656b", "8153ca9833bc3c1b91a7e66e5f4d4f5b59bf9e64c2f20d15f0bba7"),
        ("4361726c204d656e676572", "07af0c9c86e1b4e80f36b04ff7688d51141af3debd0332f0a705ef"),
        ("4a65616e2d426170746973746520536179", "6ab1467c0448cc78394494abaaf23afce0e234315d6e2624dcbfa8a21c1c4d073d"),
        (
            "457567656e2042f6686d20766f6e2042617765726b",
            "dfc346c0d2296ae6cf1acf6f12b8456a1dba228cf8d8b774aacf1c47fc53aa80ebc7a4c292",
        ),
    ],
}


def test_noise_ikpsk2_cacophony_vector() -> None:
    v = IKPSK2
    ck0, h0 = noise.initial_state(noise.CONSTRUCTION, H(v["prologue"]))
    i_static = X25519PrivateKey.from_private_bytes(H(v["init_static"]))
    r_static = X25519PrivateKey.from_private_bytes(H(v["resp_static"]))
    i_pub = i_static.public_key().public_bytes_raw()
    r_pub = r_static.public_key().public_bytes_raw()
    assert r_pub == H(v["init_remote_static"])
    i_eph = X25519PrivateKey.from_private_bytes(H(v["init_ephemeral"]))
    r_eph = X25519PrivateKey.from_private_bytes(H(v["resp_ephemeral"]))
    psk = H(v["psk"])
    msgs = v["messages"]

    # -> e, es, s, ss, {payload}
    out = noise.initiator_write(ck0, h0, r_pub, i_pub, keys.shared_secret(i_static, r_pub), i_eph, H(msgs[0][0]))
    assert out is not None
    e_pub, enc_static, enc_payload, i_ck, i_h = out
    assert (e_pub + enc_static + enc_payload).hex() == msgs[0][1]

    first = noise.responder_read_static(ck0, h0, r_static, r_pub, e_pub, enc_static)
    assert first is not None and first[0] == i_pub
    second = noise.responder_read_payload(first[1], first[2], keys.shared_secret(r_static, i_pub), enc_payload)
    assert second is not None
    payload, r_ck, r_h = second
    assert payload == H(msgs[0][0]) and (r_ck, r_h) == (i_ck, i_h)

    # <- e, ee, se, psk, {payload}
    out2 = noise.responder_write(r_ck, r_h, r_eph, e_pub, i_pub, psk, H(msgs[1][0]))
    assert out2 is not None
    re_pub, enc2, r_ck, r_h = out2
    assert (re_pub + enc2).hex() == msgs[1][1]
    read = noise.initiator_read(i_ck, i_h, i_eph, i_static, re_pub, psk, enc2)
    assert read is not None
    payload, i_ck, i_h = read
    assert payload == H(msgs[1][0])
    assert i_h.hex() == r_h.hex() == v["handshake_hash"]

    # Transport: initiator->responder with k1, back with k2, counters 0, 1, ...
    k1, k2 = noise.split(i_ck)
    for i, (plain, cipher) in enumerate(msgs[2:]):
        key = k1 if i % 2 == 0 else k2
        assert noise.aead_encrypt(key, i // 2, H(plain), b"").hex() == cipher
    assert noise.split(r_ck) == (k1, k2)
