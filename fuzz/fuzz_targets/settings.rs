//! What an operator types: filter specs (`--filter`) and `serve` settings
//! (a TOML file). Bad input gets an error, never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vmcrypt::config::{ServeConfig, ServeOptions};
use vmcrypt::filter::{self, FilterSpec};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(spec) = text.parse::<FilterSpec>() {
        let _ = filter::build(&spec, 2);
        // What Display prints parses back to the same spec.
        let _ = spec.to_string().parse::<FilterSpec>();
    }
    if let Ok(opts) = toml::from_str::<ServeOptions>(text) {
        let _ = ServeConfig::try_from(opts);
    }
});
