//! Value framing: every stored value ends with the CRC-32 of what precedes it, so that a
//! damaged record is recognised (and quarantined) instead of being misread.

use serde::Serialize;
use serde::de::DeserializeOwned;

/// Appends the checksum.
pub(crate) fn seal(mut payload: Vec<u8>) -> Vec<u8> {
    let crc = crc32fast::hash(&payload);
    payload.extend_from_slice(&crc.to_le_bytes());
    payload
}

/// The payload, if the checksum holds.
pub(crate) fn open(value: &[u8]) -> Option<&[u8]> {
    let split = value.len().checked_sub(4)?;
    let (payload, crc) = value.split_at(split);
    let crc = u32::from_le_bytes(crc.try_into().ok()?);
    (crc32fast::hash(payload) == crc).then_some(payload)
}

pub(crate) fn encode<T: Serialize>(value: &T) -> Vec<u8> {
    // Serialising our own plain structs to JSON cannot fail.
    seal(serde_json::to_vec(value).unwrap_or_default())
}

pub(crate) fn decode<T: DeserializeOwned>(value: &[u8]) -> Option<T> {
    serde_json::from_slice(open(value)?).ok()
}

/// Big-endian u64, so that keys sort numerically.
pub(crate) fn be(n: u64) -> [u8; 8] {
    n.to_be_bytes()
}

pub(crate) fn read_be(bytes: &[u8]) -> Option<u64> {
    Some(u64::from_be_bytes(bytes.get(..8)?.try_into().ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn detects_damage() {
        let sealed = seal(b"hello".to_vec());
        assert_eq!(open(&sealed), Some(&b"hello"[..]));
        let mut damaged = sealed.clone();
        damaged[1] ^= 0x40;
        assert_eq!(open(&damaged), None);
        assert_eq!(open(&sealed[..3]), None);
    }
}
