//! Stable resource ids: SHA-256 (FIPS 180-4) of a resource's key, laid out as a UUID.
//! Ids need a hash that never changes between versions or machines; the known-answer
//! tests below pin it.

/// A name-based UUID (version 5 layout, SHA-256 instead of SHA-1) of a key fed piece by
/// piece (the id of the concatenation, without building the key in memory): the first
/// 16 bytes of the digest with the version and variant bits set. SHA-256 comes from the
/// `sha2` crate, which uses the CPU's SHA extensions where the processor has them.
#[derive(Clone, Default)]
pub(crate) struct KeyHasher(sha2::Sha256);

impl KeyHasher {
    pub(crate) fn update(&mut self, piece: &[u8]) {
        use sha2::Digest;
        self.0.update(piece);
    }

    /// The UUID's 16 bytes: the digest's first 16, version and variant bits set.
    pub(crate) fn digest(self) -> [u8; 16] {
        use sha2::Digest;
        let d: [u8; 32] = self.0.finalize().into();
        let mut b = [0u8; 16];
        b.copy_from_slice(&d[..16]);
        b[6] = (b[6] & 0x0f) | 0x50;
        b[8] = (b[8] & 0x3f) | 0x80;
        b
    }
}

/// The UUID's text form: lower-case hex, dashes after bytes 4, 6, 8 and 10.
pub(crate) fn uuid_text(b: &[u8; 16]) -> String {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(36);
    for (i, x) in b.iter().enumerate() {
        if matches!(i, 4 | 6 | 8 | 10) {
            out.push('-');
        }
        out.push(char::from(HEX[usize::from(x >> 4)]));
        out.push(char::from(HEX[usize::from(x & 0x0f)]));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn digest_hex(data: &[u8]) -> String {
        use sha2::Digest;
        sha2::Sha256::digest(data)
            .iter()
            .map(|x| format!("{x:02x}"))
            .collect()
    }

    /// FIPS 180-4 known answers: the hash under every id must never change.
    #[test]
    fn known_vectors() {
        for (input, expected) in [
            (
                b"".to_vec(),
                "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
            ),
            (
                b"abc".to_vec(),
                "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad",
            ),
            (
                b"abcdbcdecdefdefgefghfghighijhijkijkljklmklmnlmnomnopnopq".to_vec(),
                "248d6a61d20638b8e5c026930c3e6039a33ce45964ff2167f6ecedd419db06c1",
            ),
            (
                vec![b'a'; 1000],
                "41edece42d63e8d9bf515a9ba6932e1c20cbc9f5a5d134645adb5db1b9737ea3",
            ),
        ] {
            assert_eq!(digest_hex(&input), expected, "{} bytes", input.len());
        }
    }

    #[test]
    fn uuid_layout_and_pieces() {
        let whole = {
            let mut h = KeyHasher::default();
            h.update(b"abc");
            uuid_text(&h.digest())
        };
        // The digest's first 16 bytes, version 5 and the RFC 4122 variant set.
        assert_eq!(whole, "ba7816bf-8f01-5fea-8141-40de5dae2223");
        let mut pieces = KeyHasher::default();
        for piece in [&b"a"[..], b"", b"bc"] {
            pieces.update(piece);
        }
        assert_eq!(uuid_text(&pieces.digest()), whole);
    }
}
