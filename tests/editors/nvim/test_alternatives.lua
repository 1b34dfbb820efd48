-- Alternatives in real Neovim: an explicit request gets up to `alternatives` suggestions (the
-- greedy one first), and <M-]> / <M-[> cycle through them. Run:
--   nvim --headless --clean -l tests/editors/nvim/test_alternatives.lua PHI_LSP_BIN MODEL_DIR [auto|native|plugin]
-- Like test_controls.lua it drives a second Neovim over RPC. We type tests/editors/growing.json,
-- wait until the ghost text (an automatic request's, alone) is what `phi-lsp complete` prints, and:
--   - <M-]> asks explicitly and shows the second suggestion, another text, marked "(2/n)";
--   - <M-[> goes back to the greedy one, <M-[> again wraps to the last, <M-]> to the first again;
--   - <M-]> then <Tab> inserts the alternative shown, not the greedy one.

local here = vim.fn.fnamemodify(debug.getinfo(1, 'S').source:sub(2), ':p:h')
local h = dofile(here .. '/harness.lua').start('test_alternatives.lua', { next_key = '<M-]>', prev_key = '<M-[>' })
local typed = h.typed
local check = h.check
local expected = h.expected
local lua = h.lua
local input = h.input
local wait_for = h.wait_for
local finish = h.finish
local status = h.status
local buffer_text = h.buffer_text
local ghost = h.ghost
local ghost_is = h.ghost_is


-- The ghost text without the "(i/n)" mark that cycling adds, and the mark.
local function shown()
  local g = ghost()
  if not g then
    return nil
  end
  local i, n = g:match(' %((%d+)/(%d+)%)$')
  return (g:gsub(' %(%d+/%d+%)$', '')), tonumber(i), tonumber(n)
end

lua('vim.bo.autoindent = false; vim.bo.indentexpr = ""; vim.bo.smartindent = false')
input('i' .. typed:gsub('\n', '<CR>'))
check(wait_for(5000, function()
  return buffer_text() == typed or nil
end) ~= nil, 'the keys reach the buffer', buffer_text())
local whole = wait_for(60000, ghost_is(expected))
if not check(whole ~= nil, 'the ghost text is the whole suggestion of `phi-lsp complete`',
    ('ghost:    %q\nexpected: %q'):format(ghost() or '', expected)) then
  finish()
end
check(status().last.alternatives == 0, 'an automatic request got one suggestion', vim.inspect(status().last))

input('<M-]>')
local second = wait_for(60000, function()
  local text, i = shown()
  return text and i == 2 and text or nil
end)
local text, index, count = shown()
if not check(second ~= nil and second ~= expected, '<M-]> asks explicitly and shows another suggestion, marked (2/n)',
    ('ghost: %q (%s/%s)\ngreedy: %q'):format(text or '', index, count, expected)) then
  finish()
end
local offered = status().last.alternatives
check(count == offered and offered >= 2 and offered <= 3,
  ('the mark counts the suggestions the server offered (%s)'):format(offered), vim.inspect(status().last))

input('<M-[>')
check(wait_for(3000, function()
  local t, i = shown()
  return t == expected and i == 1 or nil
end) ~= nil, '<M-[> goes back to the greedy one (1/n)', ghost())
input('<M-[>')
check(wait_for(3000, function()
  local t, i = shown()
  return t ~= expected and i == count or nil
end) ~= nil, '<M-[> again wraps around to the last one', ghost())
input('<M-]>')
check(wait_for(3000, function()
  local t, i = shown()
  return t == expected and i == 1 or nil
end) ~= nil, '<M-]> wraps back to the first', ghost())

input('<M-]>')
wait_for(3000, function()
  local _, i = shown()
  return i == 2 or nil
end)
input('<Tab>')
check(wait_for(5000, function()
  return buffer_text() == typed .. second or nil
end) ~= nil, '<Tab> inserts the alternative shown', ('buffer: %q\nwanted: %q'):format(buffer_text(), typed .. second))
local errmsg = lua('return vim.v.errmsg')
check(errmsg == '', 'no error on the way', errmsg)

finish()
