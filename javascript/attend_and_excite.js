// Attend and Excite: the live token view inside the accordion (lib_ae/webui/token_view.py).
// A1111 injects every javascript/*.js of an extension into the page (ui_gradio_extensions.py L12); gradioApp(),
// onUiLoaded(), onAfterUiUpdate() and updateInput() are A1111's own helpers (script.js, javascript/ui.js).
(function() {
    "use strict";

    var DEBOUNCE_MS = 400;

    function setupTab(tab) {
        var app = gradioApp();
        var id = "script_" + tab + "_attend_and_excite_";
        var view = app.getElementById(id + "tokens");
        var request = app.querySelector("#" + id + "tokens_request textarea");
        var button = app.getElementById(id + "tokens_refresh");
        var subjects = app.querySelector("#" + id + "subjects textarea");
        var prompt = app.querySelector("#" + tab + "_prompt textarea");
        var methods = app.getElementById(id + "method"); // a radio group: one choice per method (lib_ae.params.METHODS)
        if (!view || !request || !button || !subjects || !prompt) {
            return null;
        }
        var last = null;
        var timer = null;

        function steps() {
            var input = app.querySelector("#" + tab + "_steps input[type=number]");
            var value = input ? Number(input.value) : 20;
            return value > 0 ? value : 20;
        }

        function method() {
            var checked = methods ? methods.querySelector("input[type=radio]:checked") : null;
            return checked ? checked.value : "excite";
        }

        function refresh() {
            timer = null;
            if (view.offsetParent === null) {
                return; // the accordion is closed (or the tab hidden): refresh when it is shown
            }
            var payload = JSON.stringify({
                prompt: prompt.value, subjects: subjects.value, steps: steps(), method: method()
            });
            if (payload === last) {
                return;
            }
            last = payload;
            request.value = payload;
            updateInput(request);
            button.click();
        }

        function schedule() {
            if (timer !== null) {
                clearTimeout(timer);
            }
            timer = setTimeout(refresh, DEBOUNCE_MS);
        }

        function sameSubject(a, b) {
            return a.trim().replace(/\s+/g, " ").toLowerCase() === b.trim().replace(/\s+/g, " ").toLowerCase();
        }

        // The typed subjects as the server parsed them (the view's legend, in order, without the suggested ones),
        // while the view shows the box's current text; only when the box changed since the last refresh is its text
        // split here. An empty box or "auto" alone means automatic subjects: none typed.
        function currentSubjects() {
            var shown = last !== null && JSON.parse(last).subjects === subjects.value &&
                view.querySelector(".ae-tokens-problem, .ae-tokens-message") === null;
            if (shown) {
                var typed = view.querySelectorAll(".ae-legend[data-ae-subject]:not([data-ae-suggested])");
                return Array.prototype.map.call(typed, function(el) {
                    return el.getAttribute("data-ae-subject");
                });
            }
            var items = subjects.value.split(",").map(function(s) {
                return s.trim();
            }).filter(function(s) {
                return s.length > 0;
            });
            return items.length === 1 && items[0].toLowerCase() === "auto" ? [] : items;
        }

        // Clicking a token toggles its word as a subject; clicking a subject's token or legend entry removes it; a
        // suggested subject (automatic subjects) is not typed yet, so a click fixes it: it is written into the box.
        view.addEventListener("click", function(event) {
            var target = event.target.closest("[data-ae-subject], [data-ae-word]");
            if (!target) {
                return;
            }
            var items = currentSubjects();
            var subject = target.getAttribute("data-ae-subject");
            var word = target.getAttribute("data-ae-word");
            var name = subject !== null ? subject : word;
            if (!name || !name.trim()) {
                return;
            }
            var kept = items.filter(function(s) {
                return !sameSubject(s, name);
            });
            if (kept.length === items.length) {
                kept.push(name.trim());
            }
            subjects.value = kept.join(", ");
            updateInput(subjects);
            schedule();
        });
        prompt.addEventListener("input", schedule);
        subjects.addEventListener("input", schedule);
        if (methods) {
            methods.addEventListener("change", schedule);
        }
        return schedule;
    }

    var schedules = [];
    onUiLoaded(function() {
        ["txt2img", "img2img"].forEach(function(tab) {
            var schedule = setupTab(tab);
            if (schedule) {
                schedules.push(schedule);
            }
        });
    });
    // Prompts also change without input events (pasted infotext, styles, "send to"), and the view must fill when the
    // accordion opens: check after every UI update; nothing is sent unless the prompt, subjects, steps or method
    // changed.
    onAfterUiUpdate(function() {
        schedules.forEach(function(schedule) {
            schedule();
        });
    });
})();
