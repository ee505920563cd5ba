//! LUKS1 headers as a damaged or hostile image may carry them: parsing
//! never panics, a parsed header's cost check and payload offset are
//! computed without overflow, and what parses writes back to the same bytes.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vmcrypt_crypto::luks::{Header, DEFAULT_MAX_ITERATIONS, HEADER_LEN};

fuzz_target!(|data: &[u8]| {
    let Ok(h) = Header::parse(data) else {
        return;
    };
    let _ = h.check_cost(DEFAULT_MAX_ITERATIONS);
    let _ = h.payload_bytes();
    let _ = h.active_slots();
    let again = Header::parse(&h.to_bytes()).expect("a header we wrote parses");
    assert_eq!(again, h);
    let _ = HEADER_LEN;
});
