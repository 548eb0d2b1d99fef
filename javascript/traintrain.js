// TrainTrain: refresh the status box at once when the page or the TrainTrain tab becomes visible again.
// Browsers slow down timers in hidden pages, so gradio's polling of the status lags behind after a while.
(function () {
    "use strict";

    function root() {
        if (typeof gradioApp === "function") return gradioApp();
        const app = document.querySelector("gradio-app");
        return (app && app.shadowRoot) || document;
    }

    function refreshStatus() {
        if (document.visibilityState !== "visible") return;
        const button = root().querySelector("#tt_status_refresh");
        if (button) button.click();
    }

    window.traintrainRefreshStatus = refreshStatus;
    document.addEventListener("visibilitychange", refreshStatus);
    document.addEventListener("click", function (event) {
        const tab = event.target instanceof Element ? event.target.closest("button") : null;
        const inTabBar = tab && tab.closest(".tab-nav, [role='tablist']");  // gradio 3 / gradio 4 tab bars
        if (inTabBar && tab.textContent.trim() === "TrainTrain") setTimeout(refreshStatus, 100);
    });
})();
