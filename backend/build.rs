//! Records the commit the binary is built from, for `vmcrypt --version`:
//! `VMCRYPT_GIT_COMMIT` from the environment (a source tarball or a
//! package build without `.git`), else `git rev-parse`, else "unknown".

use std::process::Command;

fn main() {
    println!("cargo:rerun-if-env-changed=VMCRYPT_GIT_COMMIT");
    // Only paths that exist: a missing one would make cargo rerun this on
    // every build (a source tarball, a git worktree whose .git is a file).
    for path in ["../.git/HEAD", "../.git/refs/heads", "../.git/packed-refs"] {
        if std::path::Path::new(path).exists() {
            println!("cargo:rerun-if-changed={path}");
        }
    }
    let commit = std::env::var("VMCRYPT_GIT_COMMIT")
        .ok()
        .filter(|c| !c.is_empty())
        .or_else(|| {
            let out = Command::new("git")
                .args(["rev-parse", "--short=12", "HEAD"])
                .output()
                .ok()?;
            out.status
                .success()
                .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
                .filter(|c| !c.is_empty())
        })
        .unwrap_or_else(|| "unknown".into());
    println!("cargo:rustc-env=VMCRYPT_GIT_COMMIT={commit}");
}
