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
    let mut slot = good.clone();
    slot[208..212].copy_from_slice(&0x1234u32.to_be_bytes());
    check(&slot, "key slot 0 state");
    let mut overlap = good.clone();
    overlap[208 + 40..208 + 44].copy_from_slice(&4000u32.to_be_bytes());
    check(&overlap, "overlaps");
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
