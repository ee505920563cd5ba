use super::*;

fn pass(s: &str) -> Passphrase {
    Passphrase::new(s.as_bytes().to_vec())
}

#[test]
fn create_unlock_add_remove() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("img");
    let (header, key) = create(&path, 1 << 20, &pass("one")).unwrap();
    assert_eq!(header.payload_offset, 4096);
    assert_eq!(
        std::fs::metadata(&path).unwrap().len(),
        (2 << 20) + (1 << 20)
    );
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .open(&path)
        .unwrap();
    let mut luks = Luks::open(&file, &path).unwrap();
    assert_eq!(luks.header, header);
    let (k, slot) = luks.unlock(&pass("one")).unwrap();
    assert_eq!((k.as_bytes(), slot), (key.as_bytes(), 0));
    assert!(matches!(
        luks.unlock(&pass("two")),
        Err(LuksError::WrongPassphrase)
    ));

    assert_eq!(luks.add_slot(&key, &pass("two")).unwrap(), 1);
    assert_eq!(luks.unlock(&pass("two")).unwrap().1, 1);
    assert!(matches!(luks.remove_slot(0), Ok(())));
    assert!(matches!(
        luks.unlock(&pass("one")),
        Err(LuksError::WrongPassphrase)
    ));
    assert!(matches!(luks.remove_slot(1), Err(LuksError::LastSlot(1))));
    assert!(matches!(
        luks.remove_slot(0),
        Err(LuksError::SlotNotActive(0))
    ));
    // A fresh read of the header agrees.
    let again = Luks::open(&file, &path).unwrap();
    assert_eq!(again.header.active_slots(), vec![1]);
    assert_eq!(
        again.unlock(&pass("two")).unwrap().0.as_bytes(),
        key.as_bytes()
    );
}

#[test]
fn create_refuses_an_existing_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("img");
    std::fs::write(&path, b"precious").unwrap();
    assert!(matches!(
        create(&path, 1 << 20, &pass("x")),
        Err(LuksError::Exists(_))
    ));
    assert_eq!(std::fs::read(&path).unwrap(), b"precious");
}

#[test]
fn bad_headers_get_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("img");
    create(&path, 1 << 20, &pass("x")).unwrap();
    let good = std::fs::read(&path).unwrap();
    let check = |bytes: &[u8], want: &str| {
        std::fs::write(&path, bytes).unwrap();
        let f = File::open(&path).unwrap();
        let err = Luks::open(&f, &path)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(err.contains(want), "want '{want}', got '{err}'");
    };
    check(&good[..100], "truncated");
    check(&good[..4096], "truncated");
    check(&[0u8; 8192], "not a LUKS image");
    let mut v2 = good.clone();
    v2[7] = 2;
    check(&v2, "version 2");
    let mut cbc = good.clone();
    cbc[40..72].fill(0);
    cbc[40..51].copy_from_slice(b"cbc-essiv:s");
    check(&cbc, "cipher mode");
    let mut k128 = good.clone();
    k128[108..112].copy_from_slice(&32u32.to_be_bytes());
    check(&k128, "256 bits");
    // Found by fuzzing: a key size whose bit count overflows u32.
    let mut huge = good.clone();
    huge[108..112].copy_from_slice(&0xffff_ffffu32.to_be_bytes());
    check(&huge, "34359738360 bits");
    let mut slot = good.clone();
    slot[208..212].copy_from_slice(&0x1234u32.to_be_bytes());
    check(&slot, "key slot 0 state");
    let mut overlap = good.clone();
    overlap[208 + 40..208 + 44].copy_from_slice(&4000u32.to_be_bytes());
    check(&overlap, "not between the header");
    // Material inside the header's sectors (cryptsetup starts at 8).
    let mut in_header = good.clone();
    in_header[208 + 40..208 + 44].copy_from_slice(&1u32.to_be_bytes());
    check(&in_header, "not between the header");
    // An offset near 2^32: the end is computed without overflow.
    let mut wrap = good.clone();
    wrap[208 + 40..208 + 44].copy_from_slice(&(u32::MAX - 10).to_be_bytes());
    check(&wrap, "not between the header");
    // A payload inside the header.
    let mut payload = good.clone();
    payload[104..108].copy_from_slice(&1u32.to_be_bytes());
    check(&payload, "overlaps the header");
    // Hours of PBKDF2 asked by a key slot or the digest: refused before any.
    let mut costly = good.clone();
    costly[208 + 4..208 + 8].copy_from_slice(&u32::MAX.to_be_bytes());
    check(&costly, "key slot 0 asks for 4294967295 PBKDF2 iterations");
    let mut digest = good.clone();
    digest[164..168].copy_from_slice(&u32::MAX.to_be_bytes());
    check(&digest, "master-key digest asks for");
    std::fs::write(&path, &costly).unwrap();
    let f = File::open(&path).unwrap();
    assert!(Luks::open_with_limit(&f, &path, u32::MAX).is_ok());
    // Damaged key material: the passphrase no longer opens it.
    let mut damaged = good.clone();
    damaged[8 * 512 + 100] ^= 0xff;
    std::fs::write(&path, &damaged).unwrap();
    let f = File::open(&path).unwrap();
    assert!(matches!(
        Luks::open(&f, &path).unwrap().unlock(&pass("x")),
        Err(LuksError::WrongPassphrase)
    ));
}

/// A header may record any area for an unused slot; adding a key there
/// must not write into the payload or over a slot in use.
#[test]
fn add_slot_checks_the_unused_slots_area() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("img");
    let (_, key) = create(&path, 1 << 20, &pass("x")).unwrap();
    let good = std::fs::read(&path).unwrap();
    let slot1 = 208 + 48 + 40;
    for (offset, want) in [
        (4000u32, "not between the header"), // into the payload
        (8, "overlaps key slot 0"),          // over slot 0's material
        (2, "not between the header"),       // into the header
    ] {
        let mut bytes = good.clone();
        bytes[slot1..slot1 + 4].copy_from_slice(&offset.to_be_bytes());
        std::fs::write(&path, &bytes).unwrap();
        let f = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .unwrap();
        let mut luks = Luks::open(&f, &path).unwrap();
        let err = luks.add_slot(&key, &pass("y")).unwrap_err().to_string();
        assert!(err.contains(want), "{offset}: want '{want}', got '{err}'");
        assert_eq!(
            std::fs::read(&path).unwrap(),
            bytes,
            "{offset}: image changed"
        );
    }
}
