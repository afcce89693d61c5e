//! Every example runs to success on the test adapter. The examples' `run`
//! functions are compiled into this test (their `main` only calls `run`), so
//! no nested cargo is needed.

#[path = "../examples/quickstart.rs"]
#[allow(dead_code)]
mod quickstart;

#[path = "../examples/embed_encoder.rs"]
#[allow(dead_code)]
mod embed_encoder;

#[path = "../examples/keras_port.rs"]
#[allow(dead_code)]
mod keras_port;

#[test]
fn quickstart_example_runs() {
    quickstart::run().expect("quickstart");
}

#[test]
fn embed_encoder_example_normalizes_every_frame_in_the_apps_encoder() {
    embed_encoder::run().expect("embed_encoder");
}

#[test]
fn keras_port_example_reproduces_one_convention_with_the_other() {
    keras_port::run().expect("keras_port");
}
