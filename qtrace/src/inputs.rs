//! What qtrace reads from people and files it does not control: files read whole (the config,
//! the BTF) must be regular files and are read up to a bound; text echoed back into errors is
//! clipped; errors are logged on one line; durations that drive a timer are never zero.

use std::{
    fs::File,
    io::Read,
    os::unix::fs::{FileTypeExt, OpenOptionsExt},
    path::Path,
    time::Duration,
};

use anyhow::{bail, Context, Result};

/// Most bytes of a config file read.
pub const MAX_CONFIG_BYTES: u64 = 1 << 20;
/// Most bytes of a BTF file read (a kernel's is 5–10 MiB).
pub const MAX_BTF_BYTES: u64 = 128 << 20;
/// Most characters of a value echoed back in an error.
pub const MAX_ECHO: usize = 80;

/// The whole of the regular file at `path`, refused when it is anything else (a FIFO would
/// block start-up, a device could be endless) or longer than `max` bytes.
pub fn read_regular(path: &Path, max: u64) -> Result<Vec<u8>> {
    // O_NONBLOCK: opening a FIFO must not wait for a writer; it is refused below.
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(path)?;
    let kind = file.metadata()?.file_type();
    if !kind.is_file() {
        bail!("not a regular file ({})", kind_name(kind));
    }
    read_bounded(file, max)
}

fn read_bounded(file: File, max: u64) -> Result<Vec<u8>> {
    let mut bytes = Vec::new();
    file.take(max + 1).read_to_end(&mut bytes).context("read")?;
    if bytes.len() as u64 > max {
        bail!("larger than {max} bytes");
    }
    Ok(bytes)
}

fn kind_name(kind: std::fs::FileType) -> &'static str {
    if kind.is_dir() {
        "a directory"
    } else if kind.is_fifo() {
        "a FIFO"
    } else if kind.is_char_device() {
        "a character device"
    } else if kind.is_block_device() {
        "a block device"
    } else if kind.is_socket() {
        "a socket"
    } else {
        "not a file"
    }
}

/// `text` cut to [`MAX_ECHO`] characters, saying how long it was when cut.
pub fn clip(text: &str) -> String {
    clip_to(text, MAX_ECHO)
}

pub fn clip_to(text: &str, max: usize) -> String {
    match text.char_indices().nth(max) {
        None => text.to_string(),
        Some((end, _)) => format!("{}… ({} bytes)", &text[..end], text.len()),
    }
}

/// An error and its causes on one line, whatever their messages look like (TOML errors span
/// lines), at most 2,000 characters.
pub fn one_line(err: &anyhow::Error) -> String {
    let text = format!("{err:#}");
    let lines: Vec<&str> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect();
    clip_to(&lines.join(" "), 2000)
}

/// A duration flag that drives a timer: zero is refused (a zero-period timer panics).
pub fn positive_duration(text: &str) -> Result<Duration, String> {
    match humantime::parse_duration(text) {
        Ok(d) if d.is_zero() => Err("must be more than 0 (e.g. 1s)".to_string()),
        Ok(d) => Ok(d),
        Err(e) => Err(e.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_regular_files_are_read_and_only_up_to_the_bound() {
        let e = read_regular(Path::new("/dev/zero"), 10).unwrap_err();
        assert!(format!("{e:#}").contains("character device"), "{e:#}");
        let e = read_regular(Path::new("/"), 10).unwrap_err();
        assert!(format!("{e:#}").contains("directory"), "{e:#}");
        let path = std::env::temp_dir().join(format!("qtrace-inputs-{}", std::process::id()));
        std::fs::write(&path, "0123456789").unwrap();
        assert_eq!(read_regular(&path, 10).unwrap(), b"0123456789");
        let e = read_regular(&path, 9).unwrap_err();
        assert!(format!("{e:#}").contains("larger than 9 bytes"), "{e:#}");
        std::fs::remove_file(&path).unwrap();
    }

    #[test]
    fn a_fifo_is_refused_without_blocking() {
        let path = std::env::temp_dir().join(format!("qtrace-fifo-{}", std::process::id()));
        let c = std::ffi::CString::new(path.to_str().unwrap()).unwrap();
        // SAFETY: a valid C string.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        let e = read_regular(&path, 10).unwrap_err();
        std::fs::remove_file(&path).unwrap();
        assert!(format!("{e:#}").contains("FIFO"), "{e:#}");
    }

    #[test]
    fn long_text_is_clipped_and_errors_are_one_line() {
        assert_eq!(clip("short"), "short");
        let long = "k".repeat(20_000_000);
        let c = clip(&long);
        assert!(c.len() < 120 && c.ends_with("(20000000 bytes)"), "{c}");
        let e = anyhow::anyhow!("line one\n\n  line two").context("outer");
        assert_eq!(one_line(&e), "outer: line one line two");
        assert!(positive_duration("0s").is_err());
        assert_eq!(positive_duration("2s"), Ok(Duration::from_secs(2)));
    }
}
