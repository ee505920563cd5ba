//! The XTS engine against IEEE 1619 and against the `xts-mode` crate as an oracle.

use aes::cipher::{Array, KeyInit};
use aes::Aes256;
use xts_mode::{get_tweak_default, Xts128};

use super::*;

/// IEEE 1619-2007 XTS-AES-256 vector 10: data unit sequence number 0xff.
const V10_KEY: &str = "27182818284590452353602874713526624977572470936999595749669676273141592653589793238462643383279502884197169399375105820974944592";
const V10_CT: &str = "1c3b3a102f770386e4836c99e370cf9bea00803f5e482357a4ae12d414a3e63b5d31e276f8fe4a8d66b317f9ac683f44680a86ac35adfc3345befecb4bb188fd5776926c49a3095eb108fd1098baec70aaa66999a72a82f27d848b21d4a741b0c5cd4d5fff9dac89aeba122961d03a757123e9870f8acf1000020887891429ca2a3e7a7d7df7b10355165c8b9a6d0a7de8b062c4500dc4cd120c0f7418dae3d0b5781c34803fa75421c790dfe1de1834f280d7667b327f6c8cd7557e12ac3a0f93ec05c52e0493ef31a12d3d9260f79a289d6a379bc70c50841473d1a8cc81ec583e9645e07b8d9670655ba5bbcfecc6dc3966380ad8fecb17b6ba02469a020a84e18e8f84252070c13e9f1f289be54fbc481457778f616015e1327a02b140f1505eb309326d68378f8374595c849d84f4c333ec4423885143cb47bd71c5edae9be69a2ffeceb1bec9de244fbe15992b11b77c040f12bd8f6a975a44a0f90c29a9abc3d4d893927284c58754cce294529f8614dcd2aba991925fedc4ae74ffac6e333b93eb4aff0479da9a410e4450e0dd7ae4c6e2910900575da401fc07059f645e8b7e9bfdef33943054ff84011493c27b3429eaedb4ed5376441a77ed43851ad77f16f541dfd269d50d6a5f14fb0aab1cbb4c1550be97f7ab4066193c4caa773dad38014bd2092fa755c824bb5e54c4f36ffda9fcea70b9c6e693e148c151";

fn key_from_hex(h: &str) -> MasterKey {
    MasterKey::from_bytes(&hex::decode(h).unwrap().try_into().unwrap())
}

#[test]
fn ieee_1619_vector_10() {
    let key = key_from_hex(V10_KEY);
    let pt: Vec<u8> = (0..512).map(|i| i as u8).collect();
    let ct = hex::decode(V10_CT).unwrap();
    let mut xts = Xts::new(&key).unwrap();
    let mut out = vec![0u8; 512];
    xts.encrypt(0xff, &pt, &mut out).unwrap();
    assert_eq!(out, ct);
    let mut buf = pt.clone();
    xts.encrypt_in_place(0xff, &mut buf).unwrap();
    assert_eq!(buf, ct);
    xts.decrypt_in_place(0xff, &mut buf).unwrap();
    assert_eq!(buf, pt);
}

/// A small deterministic generator (the tests must be reproducible).
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn fill(&mut self, b: &mut [u8]) {
        for x in b {
            *x = self.next() as u8;
        }
    }
}

fn oracle(key: &MasterKey) -> Xts128<Aes256> {
    let k = key.as_bytes();
    let k1: Array<u8, _> = Array::try_from(&k[..32]).unwrap();
    let k2: Array<u8, _> = Array::try_from(&k[32..]).unwrap();
    Xts128::new(Aes256::new(&k1), Aes256::new(&k2))
}

#[test]
fn random_keys_sectors_and_lengths_match_the_oracle() {
    let mut rng = Rng(0x1234_5678_9abc_def1);
    for round in 0..200 {
        let mut kb = [0u8; 64];
        rng.fill(&mut kb);
        let key = MasterKey::from_bytes(&kb);
        let sectors = 1 + (rng.next() % 64) as usize;
        // Sector numbers across 2^32, and near it.
        let first = match round % 3 {
            0 => rng.next() % (1 << 40),
            1 => (1u64 << 32) - (rng.next() % 8),
            _ => rng.next() % 1000,
        };
        let mut pt = vec![0u8; sectors * SECTOR];
        rng.fill(&mut pt);

        let mut expect = pt.clone();
        oracle(&key).encrypt_area(&mut expect, SECTOR, u128::from(first), get_tweak_default);

        let mut xts = Xts::new(&key).unwrap();
        let mut fused = vec![0u8; pt.len()];
        xts.encrypt(first, &pt, &mut fused).unwrap();
        assert_eq!(fused, expect, "fused encrypt, round {round}");
        let mut inplace = pt.clone();
        xts.encrypt_in_place(first, &mut inplace).unwrap();
        assert_eq!(inplace, expect, "in-place encrypt, round {round}");

        let mut back = expect.clone();
        xts.decrypt_in_place(first, &mut back).unwrap();
        assert_eq!(back, pt, "in-place decrypt, round {round}");
        let mut oracle_back = fused.clone();
        oracle(&key).decrypt_area(
            &mut oracle_back,
            SECTOR,
            u128::from(first),
            get_tweak_default,
        );
        assert_eq!(oracle_back, pt, "oracle decrypt, round {round}");

        // Raw single-sector calls agree with the slice API.
        let mut raw = vec![0u8; SECTOR];
        // SAFETY: both buffers are SECTOR bytes and distinct.
        unsafe { xts.encrypt_sector_raw(first, pt.as_ptr(), raw.as_mut_ptr()) }.unwrap();
        assert_eq!(raw, expect[..SECTOR]);
        // SAFETY: in place over one SECTOR-byte buffer.
        unsafe { xts.decrypt_sector_raw(first, raw.as_ptr(), raw.as_mut_ptr()) }.unwrap();
        assert_eq!(raw, pt[..SECTOR]);
    }
}

#[test]
fn equal_blocks_at_different_sectors_differ() {
    let mut xts = Xts::new(&MasterKey::generate()).unwrap();
    let mut buf = vec![0x42u8; 2 * SECTOR];
    xts.encrypt_in_place(7, &mut buf).unwrap();
    assert_ne!(buf[..SECTOR], buf[SECTOR..]);
    assert_ne!(buf[..16], buf[16..32]);
}

#[test]
fn bad_inputs_are_refused() {
    let same = MasterKey::from_bytes(&[7; 64]);
    assert!(matches!(Xts::new(&same), Err(XtsError::DuplicatedKeys)));
    let mut xts = Xts::new(&MasterKey::generate()).unwrap();
    let mut buf = vec![0u8; 100];
    assert!(matches!(
        xts.decrypt_in_place(0, &mut buf),
        Err(XtsError::Length(100))
    ));
}

#[test]
fn both_engines_agree() {
    // On a CPU without VAES/AVX-512 both sides would be aws-lc: say so
    // rather than pass without comparing anything.
    let probe = Xts::new(&MasterKey::generate()).unwrap();
    if probe.engine() != "vaes-avx512" {
        eprintln!(
            "SKIPPED both_engines_agree: this CPU runs only the {} engine",
            probe.engine()
        );
        return;
    }
    let mut rng = Rng(0xfeed_beef_1234_5678);
    for _ in 0..50 {
        let mut kb = [0u8; 64];
        rng.fill(&mut kb);
        let key = MasterKey::from_bytes(&kb);
        let n = 1 + (rng.next() % 13) as usize;
        let first = rng.next();
        let mut pt = vec![0u8; n * SECTOR];
        rng.fill(&mut pt);
        let mut a = Xts::new(&key).unwrap();
        let mut b = Xts::new_aws_lc(&key).unwrap();
        let (mut ca, mut cb) = (vec![0u8; pt.len()], vec![0u8; pt.len()]);
        a.encrypt(first, &pt, &mut ca).unwrap();
        b.encrypt(first, &pt, &mut cb).unwrap();
        assert_eq!((a.engine(), b.engine()), ("vaes-avx512", "aws-lc"));
        assert_eq!(ca, cb, "engines {} and {} differ", a.engine(), b.engine());
        a.decrypt_in_place(first, &mut ca).unwrap();
        assert_eq!(ca, pt);
    }
}

#[test]
fn tweak_sequence_wraps_across_sector_numbers() {
    // Sector numbers near 2^64 wrap as plain64 does.
    let key = MasterKey::generate();
    let mut a = Xts::new(&key).unwrap();
    let mut b = Xts::new_aws_lc(&key).unwrap();
    let pt = vec![0x11u8; 6 * SECTOR];
    let (mut ca, mut cb) = (vec![0u8; pt.len()], vec![0u8; pt.len()]);
    a.encrypt(u64::MAX - 2, &pt, &mut ca).unwrap();
    b.encrypt(u64::MAX - 2, &pt, &mut cb).unwrap();
    assert_eq!(ca, cb);
}
