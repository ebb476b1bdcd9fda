//! `portswitch query` as users run it: `eval` over a JSON object and `--var`s, `filter`
//! over JSON Lines; positioned compile errors, typed evaluation errors, bad lines
//! reported and skipped, and the exit codes.

use std::io::Write;
use std::process::{Command, Stdio};

const BIN: &str = env!("CARGO_BIN_EXE_portswitch");

/// Runs `portswitch query args…` with `stdin`; returns (exit code, stdout, stderr).
fn query(args: &[&str], stdin: &str) -> (i32, String, String) {
    let mut c = Command::new(BIN)
        .arg("query")
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    c.stdin.take().unwrap().write_all(stdin.as_bytes()).unwrap();
    let o = c.wait_with_output().unwrap();
    (
        o.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

#[test]
fn eval_over_a_json_object_and_vars() {
    let (code, out, err) = query(
        &[
            "eval",
            r#"size(items) > 2 && user.name.matches("(?i)^ä") && n * 2 == 14"#,
            "--json",
            "-",
            "--var",
            "n=7",
        ],
        r#"{"items": [1, 2, 3], "user": {"name": "Ärger"}}"#,
    );
    assert_eq!((code, out.as_str()), (0, "true\n"), "{err}");
    let (code, out, _) = query(&["eval", r#"[1, 2, 3].map(x, x * x)"#], "");
    assert_eq!((code, out.as_str()), (0, "[1, 4, 9]\n"));
    // A compile error: exit 2, with the position and a caret.
    let (code, _, err) = query(&["eval", r#"1 + "a""#], "");
    assert_eq!(code, 2);
    assert!(err.contains("1:1") && err.contains('^'), "{err}");
    // An evaluation error: exit 3, typed.
    let (code, _, err) = query(&["eval", "x / 0", "--var", "x=5"], "");
    assert_eq!(code, 3);
    assert!(err.contains("division by zero"), "{err}");
    // Bad input: exit 2.
    assert_eq!(query(&["eval", "x", "--var", "x"], "").0, 2);
    assert_eq!(query(&["eval", "x", "--json", "-"], "[1]").0, 2);
}

#[test]
fn filter_prints_matching_lines_and_reports_bad_ones() {
    let input = "{\"a\": 1}\n{\"a\": 5, \"b\": \"x\"}\nnot json\n[1]\n\n{\"a\": 9}\n";
    let (code, out, err) = query(&["filter", "a > 2"], input);
    assert_eq!(out, "{\"a\": 5, \"b\": \"x\"}\n{\"a\": 9}\n");
    assert!(
        err.contains("line 3:") && err.contains("line 4: not a JSON object"),
        "{err}"
    );
    assert!(err.contains("2 of 5 records matched; 2 skipped"), "{err}");
    assert_eq!(code, 3, "skipped lines make the exit code 3");
    let (code, out, _) = query(&["filter", "a > 100"], "{\"a\": 1}\n");
    assert_eq!((code, out.as_str()), (1, ""));
    let (code, out, _) = query(
        &["filter", r#"tags.exists(t, t.startsWith("x"))"#],
        "{\"tags\": [\"a\", \"xy\"]}\n",
    );
    assert_eq!((code, out.as_str()), (0, "{\"tags\": [\"a\", \"xy\"]}\n"));
}
