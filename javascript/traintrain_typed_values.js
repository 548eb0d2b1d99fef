// TrainTrain: the dropdowns that take typed values (network rank / alpha, conv rank / alpha, image buckets step) train
// with exactly what the box shows. gradio 3's dropdown takes typed text on key-up only, so a Tab or click that moves
// the focus first leaves the old value behind, and Enter picks the first option containing the text ("12" → 128).
// Here the text as shown is committed on Enter and whenever the box loses focus; an option chosen with the arrow keys
// (then Enter) is left to the dropdown.
(function () {
    "use strict";

    const TYPED = ["network_rank", "network_alpha", "network_conv_rank", "network_conv_alpha", "image_buckets_step"];
    const SELECTOR = TYPED.flatMap((name) => [`#tt_${name} input`, `#tt_2nd_${name} input`]).join(", ");
    const navigated = new WeakSet();

    function typedBox(event) {
        const box = event.composedPath ? event.composedPath()[0] : event.target;
        return box instanceof HTMLInputElement && box.matches(SELECTOR) ? box : null;
    }

    function commit(box) {
        box.dispatchEvent(new KeyboardEvent("keyup", { key: "Unidentified", bubbles: true }));
    }

    document.addEventListener("keydown", function (event) {
        const box = typedBox(event);
        if (!box) return;
        if (event.key === "ArrowUp" || event.key === "ArrowDown") {
            navigated.add(box);
        } else if (event.key !== "Enter") {
            navigated.delete(box);
        } else if (!navigated.has(box)) {
            event.stopImmediatePropagation();
            event.preventDefault();
            commit(box);
            box.blur();
        }
    }, true);

    document.addEventListener("blur", function (event) {
        const box = typedBox(event);
        if (box) commit(box);
    }, true);

    window.traintrainTypedValues = SELECTOR;
})();
