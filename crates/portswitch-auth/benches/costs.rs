//! `cargo bench -p portswitch-auth`: what security costs per operation. Prints
//! nanoseconds per call; a plain loop with `black_box`, no statistics library.

use std::hint::black_box;
use std::time::Instant;

use portswitch_auth::acl::{Access, Grant, Perm, Perms, Role};
use portswitch_auth::scram::{
    Channel, ClientExchange, ServerExchange, Verifier, ITERATIONS_DEFAULT,
};

fn per_call(name: &str, iters: u64, mut f: impl FnMut()) {
    for _ in 0..iters / 10 {
        f(); // warm up
    }
    let t0 = Instant::now();
    for _ in 0..iters {
        f();
    }
    let ns = t0.elapsed().as_nanos() as f64 / iters as f64;
    println!("{name:<58} {ns:>12.1} ns");
}

fn main() {
    let grants = |n: usize| Role {
        name: "r".into(),
        grants: (0..n)
            .map(|i| Grant {
                prefix: if i + 1 == n {
                    b"svc/billing/".to_vec()
                } else {
                    format!("other{i}/").into_bytes()
                },
                perms: Perms::parse("register,query").unwrap(),
            })
            .collect(),
    };
    let one = Access::of([&grants(1)]);
    let ten = Access::of([&grants(10)]);
    let port = b"svc/billing/leader-0001";
    per_call("ACL check, 1 grant (allowed)", 50_000_000, || {
        black_box(one.allows(Perm::Register, black_box(port)));
    });
    per_call(
        "ACL check, 10 grants, match on the last",
        50_000_000,
        || {
            black_box(ten.allows(Perm::Register, black_box(port)));
        },
    );
    per_call("ACL check, 10 grants, denied", 50_000_000, || {
        black_box(ten.allows(Perm::Send, black_box(port)));
    });

    let verifier = Verifier::new("Tulip-Orbit-93", b"0123456789abcdef", ITERATIONS_DEFAULT);
    // Prepare client messages once; the server's share is then measured alone.
    let (client, first) =
        ClientExchange::start("alice", "Tulip-Orbit-93", "clientnonce", Channel::Plain);
    let (_, server_first) = ServerExchange::start(
        &first,
        |_| Some(verifier.clone()),
        &[0; 32],
        "servernonce",
        Channel::Plain,
    )
    .unwrap();
    let (_, client_final) = client.respond(&server_first, Channel::Plain).unwrap();
    per_call(
        "SCRAM login, server side (both messages, verify proof)",
        200_000,
        || {
            let (ex, _) = ServerExchange::start(
                &first,
                |_| Some(verifier.clone()),
                &[0; 32],
                "servernonce",
                Channel::Plain,
            )
            .unwrap();
            black_box(ex.finish(&client_final, Channel::Plain).unwrap());
        },
    );
    per_call(
        "SCRAM login, client side (PBKDF2, 16384 iterations)",
        100,
        || {
            let (c, _) =
                ClientExchange::start("alice", "Tulip-Orbit-93", "clientnonce", Channel::Plain);
            black_box(c.respond(&server_first, Channel::Plain).unwrap());
        },
    );
    per_call(
        "new verifier (user add / passwd, 16384 iterations)",
        100,
        || {
            black_box(Verifier::new(
                "Tulip-Orbit-93",
                b"0123456789abcdef",
                ITERATIONS_DEFAULT,
            ));
        },
    );
}
